"""No control character from a device or an API answer reaches the operator's terminal: a profile
whose name carries one is refused when it is validated, and `fedprune status`/`fedprune devices`
write out any control character they are given instead of printing it (issue 22, item 6)."""

from __future__ import annotations

import pytest

from coordinator.service.api_client import devices_text, status_text
from device_profiles.catalogue import catalogue_profile
from device_profiles.profile import ProfileError, parse_profile

# Clear the screen, set the window title, a C1 CSI (one byte on an 8-bit terminal), a bidi override.
HOSTILE = "rpi\x1b[2J\x1b]0;owned\x07\x9b31m\u202eevil\nrow"


def shown(text: str) -> None:
    """Fail if `text` holds a character a terminal acts on (a newline between lines is fine)."""
    acting = sorted({c for c in text if c != "\n" and not c.isprintable()})
    assert not acting, f"control characters reach the terminal: {acting!r}"


@pytest.mark.parametrize("field", ["name", "source", "arch", "os"])
def test_a_profile_string_with_control_characters_is_refused(field):
    data = catalogue_profile("rpi4-4gb").model_dump(mode="json")
    assert parse_profile(data).name == "rpi4-4gb"
    for bad in ("rpi\x1b[2J", "rpi\x9b31m", "a\nb", "\x7f"):
        with pytest.raises(ProfileError, match=field):
            parse_profile({**data, field: bad})


def _device(device_class: str) -> dict:
    """One entry of /devices (http_api.DeviceView)."""
    plan = {"width_ratio": 0.5, "physical_batch_size": 8, "local_samples": 60,
            "download_dtype": "fp16", "download_keep": 1.0, "upload_dtype": "int8",
            "upload_keep": 0.25, "download_bytes": 2_000_000, "upload_bytes": 500_000,
            "predicted_peak_bytes": 400_000_000,
            "memory_limit_bytes": 540_000_000, "fits": True, "reasons": [], "decisions": {}}
    return {"device_id": "dev-0", "device_class": device_class, "memory_available_bytes": 600_000_000,
            "download_bytes_per_second": 1e6, "upload_bytes_per_second": 5e5, "state": "online",
            "plan": plan, "last_seen": 1_767_225_600.0, "rounds_participated": 1,
            "epsilon_spent": 1.5, "epsilon_budget": 10.0,
            "bytes_down": 4_000_000, "bytes_up": 1_000_000}


def test_fedprune_devices_writes_out_control_characters():
    out = devices_text([_device(HOSTILE)])
    shown(out)
    assert "rpi\\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\u202eevil\\nrow" in out
    assert len([line for line in out.splitlines() if "dev-0" in line]) == 1  # no forged row


def test_fedprune_status_writes_out_control_characters():
    status = {"fleet": HOSTILE, "rounds_committed": 1, "rounds_total": 2,
              "process": {"devices_registered": 1}, "current": None,
              "messages": {"refused": 0, "failed": 0}}
    rounds = [{"number": 1, "state": "committed", "selected": 1, "accepted": 1, "straggled": 0,
               "refused": 0, "rejected": 0, "missing": 0, "refused_by_reason": {HOSTILE: 1},
               "bytes_up": 10, "bytes_down": 10, "global_accuracy": 0.5,
               "personalized_accuracy": None, "epsilon_max": 1.0, "duration_seconds": 2.0}]
    out = status_text(status, rounds)
    shown(out)
    assert out.startswith("fleet rpi\\x1b[2J") and "\\u202eevil\\nrow:1" in out
