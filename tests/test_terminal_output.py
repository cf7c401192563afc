"""No control character from a device or an API answer reaches the operator's terminal: a profile
whose name carries one is refused when it is validated, and `fedprune status`/`fedprune devices`
write out any control character they are given instead of printing it (issue 22, item 6).

And the commands read the same in a file as in a terminal (issue 24, item 5): redirected, no
progress bar's carriage returns glue fragments onto table rows, no foreign warning the user
cannot act on (Opacus's "Optimal order is the largest alpha", the TFLite toolchain's start-up
notices) and tables within 100 columns. The demo's output is checked in test_demo.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


# What the toolchains print when left alone: Opacus's RDP bound at the edge of its orders, absl's
# and TensorFlow's start-up lines, oneDNN's and torchao's notices, LiteRT's XNNPACK line.
FOREIGN = ("Optimal order", "alpha", "absl", "oneDNN", "torchao", "XNNPACK", "TensorFlow",
           "WARNING", "W0000", "I0000", "Warning")


def redirected(tmp_path: Path, command: str, *args: str) -> str:
    """`command args > out.txt 2>&1`, as a user keeps a run's output, and what the file holds."""
    out = tmp_path / "out.txt"
    with open(out, "w") as handle:
        run = subprocess.run([Path(sys.executable).parent / command, *args], stdout=handle,
                             stderr=subprocess.STDOUT, cwd=tmp_path, timeout=600)
    text = out.read_text()
    assert run.returncode == 0, text[-3000:]
    return text


def reads_well(text: str, prose: tuple[str, ...] = ()) -> None:
    """No carriage return (a progress bar's frame), no foreign notice, every line within 100
    columns but those starting with `prose`."""
    assert "\r" not in text, f"progress frames in a redirected output: {text[:2000]!r}"
    foreign = [line for line in text.splitlines() if any(word in line for word in FOREIGN)]
    assert not foreign, foreign
    wide = [line for line in text.splitlines() if len(line) > 100 and not line.startswith(prose)]
    assert not wide, wide


def test_simulate_with_dp_and_a_fleet_redirected_to_a_file(tmp_path):
    """Its progress bar is off (not a terminal), Opacus's RDP bound is tight at every round's
    epsilon (RDP_ORDERS), and the round and plan tables fit 100 columns."""
    text = redirected(tmp_path, "fedprune", "simulate", "--strategy", "fedp3", "--fleet",
                      "catalogue:0", "--clients", "3", "--rounds", "2", "--local-epochs", "1",
                      "--set", "max_client_samples=100", "--set", "dp.target_epsilon=4",
                      "--json-out", "s.json")
    # The summary's sentences (coordinator/cli.py) are not wrapped yet; its tables fit.
    reads_well(text, prose=("final: ", "simulated time ", "privacy: "))
    assert "privacy: per-device epsilon max" in text
    # A line a round while it runs, in place of the bar (stderr, before the summary's tables).
    assert [line.split(",")[0] for line in text.splitlines() if line.startswith("fedp3 ")] == \
        ["fedp3 classes:5: round 1/2", "fedp3 classes:5: round 2/2"]
    table = text[text.index("device "):].splitlines()
    assert len([line for line in table if "#" in line.split(" ")[0]]) == 3  # one row per device
    assert all("MB" in line.split()[-5] for line in table[1:4])  # upload: planned MB, not 'k1'


def test_profile_redirected_to_a_file(tmp_path):
    text = redirected(tmp_path, "fedprune-edge", "profile", "--bandwidth", "2M,8M", "--quick",
                      "--out", "p.json")
    reads_well(text)
    assert text.startswith("profile of ") and "samples/s DP" in text


@pytest.mark.skipif(subprocess.run([sys.executable, "-c", "import ai_edge_litert, litert_torch"],
                                   capture_output=True).returncode != 0,
                    reason="the TFLite toolchain is an extra (fedprune[tflite])")
def test_export_says_only_its_own_lines(tmp_path):
    """Without the kept start-up notices, `fedprune export` printed 7 lines of absl, oneDNN,
    torchao and XNNPACK notices before its table."""
    from edge_sdk.checkpoint import Checkpoint
    from edge_sdk.models import build_model, model_spec

    spec = model_spec("fedp3_cnn", (1, 28, 28), 10)
    Checkpoint(spec, dict(build_model(spec, seed=0).state_dict()), "fedp3_cnn", "fashion-mnist",
               round=1).save(tmp_path / "global.pt")
    text = redirected(tmp_path, "fedprune", "export", "--checkpoint", "global.pt", "--format",
                      "all", "--verify-samples", "64", "--out", "bundle")
    reads_well(text)
    lines = text.splitlines()
    assert lines[0].startswith("global: width 1,") and lines[1].startswith("artifact")
    assert [line.split()[0] for line in lines[2:-1]] == ["model-fp32.onnx", "model-fp32.tflite"]
    assert lines[-1].startswith("verified on 64 real fashion-mnist test samples")
