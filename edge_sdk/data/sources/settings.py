"""The `[data]` table: one settings model for a device's edge.toml and a simulation's config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from ...settings import Settings

CONFIG_DIR = "config_dir"  # validation context key: the folder of the config file being read


def _names(value: Any) -> Any:
    """TOML class lists may be numbers (classes = [0, 1]): they are names all the same."""
    if isinstance(value, (list, tuple)):
        return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return value


def _distinct(names: tuple[str, ...]) -> tuple[str, ...]:
    doubled = sorted({name for name in names if names.count(name) > 1})
    if doubled:
        raise ValueError(f"{', '.join(map(repr, doubled[:5]))} listed more than once; each class "
                         "is one output of the model")
    return names


ClassNames = Annotated[tuple[Annotated[str, Field(min_length=1, max_length=200)], ...],
                       BeforeValidator(_names), Field(min_length=1, max_length=100_000),
                       AfterValidator(_distinct)]
Dimension = Annotated[int, Field(ge=1, le=1 << 16)]


class DataSettings(Settings):
    """Where the samples a device trains on (or a simulation partitions) come from.

    Keys of `[data]` (each source reads only its own; another one set is an error):

    - `source`: `imagefolder`, `csv`, `npz`, `benchmark` (the default), `contract` (no samples:
      only `input_shape`, `classes`, `mean`, `std` and `input_scale`, the model input a
      coordinator's fleet trains on; contract.py), an entry point of the
      `fedprune.data_sources` group, or `package.module:function` returning a
      `torch.utils.data.Dataset` of (x, y) or (x, y, user) items. The function is called with the
      `[data.options]` table as keywords, `path=` when `path` is set, and `split="train"` /
      `"test"` when it takes a `split` (the test split is then the test data).
    - `path`: the folder (imagefolder: one sub-folder per class), CSV file or .npz file.
      Relative paths are read from the config file's folder and may not lead out of it; a
      path that does not exist is an error. `test_path`: separate test data of the same kind
      (a simulation's global test set and a coordinator's evaluation set; a device's local test
      set); without it the data is split.
    - `classes`: the class names in the model's output order. Default: imagefolder's sorted
      sub-folder names; integer labels 0..max; otherwise the sorted distinct labels. A label
      matches a class by name, or as an index when no class name is an integer. A device's
      class list must be the fleet's, so set it on devices whose data may miss a class.
    - `input_shape`: the model's input, e.g. [3, 32, 32] (required for imagefolder: images are
      converted to 1 (L), 3 (RGB) or 4 (RGBA) channels and resized to H x W); a flat row of the
      same size is reshaped to it. Default: the first usable sample's shape.
    - `mean`, `std`: per-channel normalisation (one value or one per channel), applied after an
      image's scaling to [0, 1]; CSV and npz values are taken as they are.
    - `test_share`: the share of samples kept for testing, split locally with `seed`
      (default 0.2; the benchmark keeps its historical 0.3). In a simulation without test data
      the same share is first held out as the global test set; a coordinator evaluates on
      that same held-out share.
    - `input_scale` (contract): what raw values are divided by before `mean` and `std`, as the
      exported manifest states it: 255 for 8-bit images (an image folder's), 1 (the default)
      for values taken as they are.
    - `label_column`, `feature_columns` (csv): the label's column and the feature columns
      (default: every other column). `user_column` (csv: a column; npz: an array): who each
      sample belongs to, for the `natural` partition of a simulation.
    - `dataset`, `partition`, `clients`, `device_index`, `data_dir` (benchmark): shard
      `device_index` of `clients` of a public benchmark (fashion-mnist, mnist, femnist), cut by
      `partition` with `seed`: the demo's and the research runs' data. In a simulation `clients`
      and `partition` are the run's own keys.

    A sample that cannot be used (an unreadable image, a non-numeric cell, NaN or infinity, a
    label outside the classes) is skipped and counted by reason; a source with nothing usable
    is refused, naming the file and row of its first failures.
    """

    source: str = "benchmark"
    path: str | None = None
    test_path: str | None = None
    classes: ClassNames | None = None
    input_shape: tuple[Dimension, ...] | None = Field(None, min_length=1, max_length=4)
    mean: tuple[float, ...] | None = Field(None, min_length=1, max_length=4096)
    std: tuple[Annotated[float, Field(gt=0)], ...] | None = Field(None, min_length=1, max_length=4096)
    test_share: float | None = Field(None, gt=0, lt=1)
    input_scale: float | None = Field(None, gt=0)
    seed: int = 0
    label_column: str | None = None
    feature_columns: tuple[str, ...] | None = Field(None, min_length=1)
    user_column: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    dataset: str = "fashion-mnist"
    partition: str = "classes:5"
    clients: int = Field(100, ge=1)
    device_index: int = Field(0, ge=0)
    data_dir: str | None = None

    @field_validator("path", "test_path")
    @classmethod
    def _resolved(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        return str(resolve_path(value, (info.context or {}).get(CONFIG_DIR)))

    @model_validator(mode="after")
    def _fits_its_source(self, info: ValidationInfo):
        from .registry import source_kind

        kind = source_kind(self.source, (info.context or {}).get(CONFIG_DIR))
        # A key at its default is not a choice (a dumped config reads back as it was written).
        foreign = sorted(key for key, spec in type(self).model_fields.items()
                         if key not in kind.keys and getattr(self, key) != spec.get_default(
                             call_default_factory=True))
        if foreign:
            raise ValueError(f"{foreign[0]}: the {kind.name} source does not read "
                             f"{', '.join(foreign)}; its keys are {', '.join(sorted(kind.keys))}")
        if kind.path == "required" and self.path is None:
            raise ValueError(f"path: the {kind.name} source needs a path ({kind.path_help})")
        for key in ("path", "test_path"):
            value = getattr(self, key)
            if value is not None and kind.path_type == "folder" and not Path(value).is_dir():
                raise ValueError(f"{key}: {value} is not a folder ({kind.path_help})")
            if value is not None and kind.path_type == "file" and not Path(value).is_file():
                raise ValueError(f"{key}: {value} is not a file ({kind.path_help})")
        if self.input_shape is not None:
            channels = self.input_shape[0]
            for key in ("mean", "std"):
                values = getattr(self, key)
                if values is not None and len(values) not in (1, channels):
                    raise ValueError(f"{key}: {len(values)} values; give one, or one per "
                                     f"channel ({channels}, the first of input_shape)")
        if kind.check is not None:
            kind.check(self)
        return self

    @property
    def local_test_share(self) -> float:
        if self.test_share is not None:
            return self.test_share
        return 0.3 if self.source == "benchmark" else 0.2

    @property
    def name(self) -> str:
        """What the data is called in checkpoints and logs."""
        if self.source == "benchmark":
            return self.dataset
        return f"{self.source}:{Path(self.path).name}" if self.path else self.source


def resolve_path(value: str, config_dir: str | Path | None) -> Path:
    """`value` read from `config_dir` (the working folder when None). A relative path may not
    lead out of that folder (`../../etc`, or a symlink out of it); an absolute path is the
    owner's explicit choice. Either must exist."""
    base = Path(config_dir if config_dir is not None else Path.cwd()).resolve()
    given = Path(value).expanduser()
    resolved = (base / given).resolve()
    if not given.is_absolute() and not resolved.is_relative_to(base):
        raise ValueError(f"{value!r} leads out of {base}, the folder of the config "
                         "file; give a path inside it, or an absolute path")
    if not resolved.exists():
        raise ValueError(f"{resolved} does not exist")
    return resolved
