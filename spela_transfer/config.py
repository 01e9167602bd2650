"""Frozen configuration dataclasses shared by the extraction and evaluation stages.

Each field has one command-line flag; YAML files in `configs/` supply defaults
that flags override. Validation happens once, in `__post_init__`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml

if TYPE_CHECKING:
    from spela_transfer.heads.config import BackpropConfig, SpelaConfig

DEFAULT_BACKBONE = "resnet50.tv_in1k"
OFFLINE_BACKBONE = "efficientnet_lite0.offline"
SAMPLE_DATASET = "fashion-mnist-sample"


@dataclass(frozen=True)
class ExtractConfig:
    """Extraction request to the feature cache: the dataset, the backbone and the settings.

    Attributes:
        dataset: An image folder, a CSV of `path,label`, a torchvision dataset name
            (`cifar10`, `fashion-mnist`, ...), or `fashion-mnist-sample`, the sample
            shipped in the package.
        root: Folder of a torchvision dataset; for `fashion-mnist`, defaults to the
            files of Debian's `dataset-fashion-mnist` package.
        split: Split of a torchvision dataset: `train`, `test` or `all` (both).
        download: Let torchvision download the dataset into `root`.
        backbone: A timm model name (tags included), `efficientnet_lite0.offline`,
            or `pixels`.
        weights: Local `.pth` or `.safetensors` state dict that replaces the
            pretrained weights.
        download_weights: Let timm download pretrained weights that are not in the
            local Hugging Face or torch hub cache; otherwise a missing file is an error.
        pretrained: Load pretrained weights; False gives random init.
        image_size: Input size in pixels that overrides the backbone's pretrained
            config (for `pixels`, the side the image is resized to).
        batch_size: Images per backbone forward pass.
        num_workers: Image-decoding worker processes; None picks from the CPU count.
        dtype: Storage type of the cached features; both load as float32.
        limit: Images per class, drawn with `subset_seed`; None keeps every image.
        subset_seed: Seed of the per-class subset.
        on_bad_image: `skip` records undecodable images in the manifest; `fail` stops.
        cache_dir: Root folder of the feature cache.
        device: Torch device for the backbone (`cpu`, `cuda`, `cuda:1`, or `auto`).
    """

    dataset: str = SAMPLE_DATASET
    root: str | None = None
    split: Literal["train", "test", "all"] = "all"
    download: bool = False
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    download_weights: bool = False
    pretrained: bool = True
    image_size: int | None = None
    batch_size: int = 64
    num_workers: int | None = None
    dtype: Literal["float32", "float16"] = "float32"
    limit: int | None = None
    subset_seed: int = 0
    on_bad_image: Literal["skip", "fail"] = "skip"
    cache_dir: str = "features"
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {self.split!r}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16', got {self.dtype!r}")
        if self.on_bad_image not in ("skip", "fail"):
            raise ValueError(f"on_bad_image must be 'skip' or 'fail', got {self.on_bad_image!r}")
        for name in ("batch_size", "image_size", "limit"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be 0 or more, got {self.num_workers!r}")
        for name in ("download", "download_weights", "pretrained"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


# ---------------------------------------------------------------------------
# Experiment configuration: what `spela-transfer fit` trains and evaluates.
# ---------------------------------------------------------------------------

HEAD_NAMES = ("spela", "backprop", "logreg")
PROTOCOL_NAMES = ("test-size", "k-shot")
# Test sizes of the SPELA paper's transfer-learning tables (arXiv 2402.09769).
REFERENCE_TEST_SIZES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def _check_names(name: str, values: tuple[str, ...], valid: tuple[str, ...]) -> None:
    if not values:
        raise ValueError(f"{name} must list at least one of {', '.join(valid)}; got none")
    unknown = [value for value in values if value not in valid]
    if unknown:
        raise ValueError(
            f"unknown {name} {', '.join(map(repr, unknown))}; valid {name}: {', '.join(valid)}"
        )
    check_distinct(name, values)


def check_distinct(name: str, values: Sequence) -> None:
    """Raise ValueError if `values` contains a value twice, as a seed or point would run twice."""
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat a value, got {list(values)!r}; list each once")


def _check_test_size(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(
            f"{name} must be a fraction strictly between 0 and 1 (0.1 keeps 10 % for testing), "
            f"got {value!r}"
        )


@dataclass(frozen=True)
class ProtocolConfig:
    """Settings of the train/test splits of each protocol.

    Attributes:
        names: Protocols to run: `test-size` (split the whole feature set at each
            test size) and `k-shot` (k training samples per class).
        test_sizes: Fractions of the samples held out for testing, each in (0, 1).
        k_shots: Training samples per class for the k-shot protocol.
        k_shot_test_size: Test fraction of the fixed split the k-shot protocol
            evaluates on; the k samples per class come from the rest.
        split_seed: `random_state` of every `train_test_split`, the same for every run.
        stratify: Stratify the splits by label (the reference protocol does not).
    """

    names: tuple[str, ...] = ("test-size", "k-shot")
    test_sizes: tuple[float, ...] = (0.1, 0.5, 0.9, 0.99)
    k_shots: tuple[int, ...] = (1, 5, 10, 20)
    k_shot_test_size: float = 0.5
    split_seed: int = 100
    stratify: bool = False

    def __post_init__(self) -> None:
        _check_names("protocols", self.names, PROTOCOL_NAMES)
        if "test-size" in self.names and not self.test_sizes:
            raise ValueError("test_sizes must not be empty when the test-size protocol runs")
        for value in self.test_sizes:
            _check_test_size("test size", value)
        check_distinct("test_sizes", self.test_sizes)
        if "k-shot" in self.names and not self.k_shots:
            raise ValueError("k_shots must not be empty when the k-shot protocol runs")
        for value in self.k_shots:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"k-shot must be a positive integer, got {value!r}")
        check_distinct("k_shots", self.k_shots)
        _check_test_size("k_shot_test_size", self.k_shot_test_size)
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise ValueError(f"split_seed must be an integer, got {self.split_seed!r}")
        if not isinstance(self.stratify, bool):
            raise ValueError(f"stratify must be true or false, got {self.stratify!r}")


# The offline demo's extraction: all 5,000 images of the shipped sample at 64 pixels.
DEMO_EXTRACT = ExtractConfig(backbone=OFFLINE_BACKBONE, image_size=64)


@dataclass(frozen=True)
class ExperimentConfig:
    """One whole experiment: features, heads, protocols and seeds.

    The defaults are the offline demo (the shipped Fashion-MNIST sample through
    the bundled EfficientNet-Lite0); `configs/paper-transfer.yaml` holds the
    reference transfer protocol.

    Attributes:
        extract: Which features to extract through the cache.
        features: A cache folder to use instead of extracting; its backbone must
            match `extract.backbone` when the backbone was requested explicitly.
        heads: Heads to train: `spela`, `backprop`, `logreg`.
        protocol: Split settings.
        seeds: Head seeds; every protocol point runs once per seed.
        epochs: Training epochs of the SPELA and backprop heads.
        batch_size: Mini-batch size of the SPELA and backprop heads.
        lr: Learning rate of the SPELA and backprop heads' optimizer.
        hidden_widths: Hidden layer widths; None applies the class-count rule
            (more than 50 classes: 1024, 1024; otherwise 512, 64).
        spela: Further `SpelaConfig` fields, such as the loss.
        backprop: Further `BackpropConfig` fields.
        logreg_max_iter: Iteration limit of the logistic-regression probe.
        device: Torch device of the heads (`cpu`, `cuda`, `cuda:1` or `auto`).
        threads: CPU threads of torch and of the BLAS under scikit-learn while heads
            train; None keeps the libraries' defaults. The default of 1 suits the
            small matrices of these heads on shared CPUs.
            One thread avoids the slowdown of idle threads waiting for a busy core on
            a shared machine. With `parallel_fits` above 1, this is the thread count of
            each fit process.
        parallel_fits: Fits that run at once, each in its own process. On an idle
            2-core CPU, 2 processes of 1 thread each trained the reference protocol's
            heads 1.7 times as fast as 1 process of 2 threads, because the batch-32
            products are too small to split well. Starting the processes takes
            seconds, so short fits can be slower.
        out: Output folder; None picks `results/<dataset>-<backbone>-<time>`.
    """

    extract: ExtractConfig = field(default_factory=lambda: DEMO_EXTRACT)
    features: str | None = None
    heads: tuple[str, ...] = HEAD_NAMES
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    hidden_widths: tuple[int, ...] | None = None
    spela: dict = field(default_factory=dict)
    backprop: dict = field(default_factory=dict)
    logreg_max_iter: int = 1000
    device: str = "auto"
    threads: int | None = 1
    parallel_fits: int = 1
    out: str | None = None

    def __post_init__(self) -> None:
        _check_names("heads", self.heads, HEAD_NAMES)
        if not self.seeds:
            raise ValueError("seeds must list at least one integer seed, got none")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ValueError(f"seeds must be integers of 0 or more, got {seed!r}")
        check_distinct("seeds", self.seeds)
        for name in ("epochs", "batch_size", "logreg_max_iter", "parallel_fits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ValueError(f"threads must be a positive integer or null, got {self.threads!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or self.lr <= 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.hidden_widths is not None and (
            not self.hidden_widths
            or any(
                isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.hidden_widths
            )
        ):
            raise ValueError(
                f"hidden_widths must be positive integers or null, got {self.hidden_widths!r}"
            )
        for name in ("spela", "backprop"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(
                    f"{name} must be a mapping of head settings, got {getattr(self, name)!r}"
                )
        # Head settings are checked here, not when the first head trains after extraction.
        for head in ("spela", "backprop"):
            if head in self.heads:
                self.head_config(head)

    def head_config(self, head: str) -> SpelaConfig | BackpropConfig:
        """Return the `SpelaConfig` or `BackpropConfig` of `head`: shared settings, then its own.

        Raises:
            ValueError: A head setting that is unknown or invalid.
        """
        from spela_transfer.heads.config import BackpropConfig, SpelaConfig

        shared = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "hidden_widths": self.hidden_widths,
        }
        own = self.spela if head == "spela" else self.backprop
        settings = {**shared, **{k: tuple(v) if isinstance(v, list) else v for k, v in own.items()}}
        config_class = SpelaConfig if head == "spela" else BackpropConfig
        _reject_unknown_keys(own, config_class, head)
        try:
            return config_class(**settings)
        except (TypeError, ValueError) as error:
            raise ValueError(f"invalid {head} setting: {error}") from error


def parse_seeds(value: object, source: str = "seeds") -> tuple[int, ...]:
    """Parse seeds from a YAML list, a comma-separated string or one integer.

    Args:
        value: `[0, 1, 2]`, `"0,1,2"`, `"0 1 2"`, `["0", "1"]` or `3`.
        source: Where the value came from, for the error message.

    Returns:
        The seeds as a tuple of ints.

    Raises:
        ValueError: An entry is not a whole number (booleans and fractions included).
    """
    if isinstance(value, str):
        items: list[object] = [item for item in value.replace(",", " ").split() if item]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]

    seeds = []
    for item in items:
        if isinstance(item, (bool, float)):
            raise ValueError(f"{source} must be whole numbers such as 0, 1, 2; got {item!r}")
        if isinstance(item, str):
            if not item.strip().lstrip("-").isdigit():
                raise ValueError(
                    f"{source} must be whole numbers such as 0, 1, 2; got {item!r} in {value!r}"
                )
            item = int(item)
        if not isinstance(item, int):
            raise ValueError(f"{source} must be whole numbers such as 0, 1, 2; got {item!r}")
        seeds.append(item)
    return tuple(seeds)


def experiment_config_to_dict(config: ExperimentConfig) -> dict:
    """Convert an experiment config to plain YAML/JSON types (tuples become lists)."""

    def plain(value: object) -> object:
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    return plain(asdict(config))


def experiment_config_from_dict(data: dict, source: str = "config") -> ExperimentConfig:
    """Build an experiment config from nested mappings, as read from YAML.

    Args:
        data: Top-level keys are `ExperimentConfig` fields; `extract` and
            `protocol` are mappings of `ExtractConfig` and `ProtocolConfig` fields.
        source: Name of the file or flag set, for error messages.

    Raises:
        ValueError: An unknown key, or a value that fails validation.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    data = dict(data)
    _reject_unknown_keys(data, ExperimentConfig, source)

    extract = data.pop("extract", None) or {}
    protocol = data.pop("protocol", None) or {}
    for name, section, cls in (
        ("extract", extract, ExtractConfig),
        ("protocol", protocol, ProtocolConfig),
    ):
        if not isinstance(section, dict):
            raise ValueError(f"{source}: '{name}' must be a mapping, got {section!r}")
        _reject_unknown_keys(section, cls, f"{source}: {name}")

    protocol = dict(protocol)
    for key in ("names", "test_sizes", "k_shots"):
        if key in protocol:
            protocol[key] = _as_tuple(protocol[key])
    if "seeds" in data:
        data["seeds"] = parse_seeds(data["seeds"], f"{source}: seeds")
    for key in ("heads", "hidden_widths"):
        if data.get(key) is not None:
            data[key] = _as_tuple(data[key])
    for key in ("spela", "backprop"):
        if data.get(key) is None and key in data:
            data[key] = {}

    extract_settings = {**asdict(DEMO_EXTRACT), **extract}
    if "backbone" in extract and "image_size" not in extract:
        # The demo's small input size is chosen for its own backbone and images. A named
        # backbone keeps the input size of its pretrained config unless one is given.
        extract_settings["image_size"] = None
    return build_config(
        ExperimentConfig,
        source,
        extract=build_config(ExtractConfig, f"{source}: extract", **extract_settings),
        protocol=build_config(ProtocolConfig, f"{source}: protocol", **protocol),
        **data,
    )


def build_config(cls: type, source: str, **settings: object) -> object:
    """Construct a config dataclass; a value it rejects is reported as coming from `source`.

    Raises:
        ValueError: `cls` rejects a value; the message starts with `source`.
    """
    try:
        return cls(**settings)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error


def load_experiment_config(
    path: str | Path | None, overrides: dict | None = None
) -> ExperimentConfig:
    """Read an experiment YAML file and apply flag overrides.

    Args:
        path: YAML file; None starts from the defaults (the offline demo).
        overrides: Settings that replace the file's, keyed like the YAML file;
            `extract`, `protocol`, `spela` and `backprop` are nested mappings merged
            key by key.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: The file is not valid YAML, or a setting is invalid.
    """
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"config file {str(path)!r} not found; pass an existing YAML file"
            )
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            # PyYAML messages span several lines; the command line prints errors as one.
            raise ValueError(f"{source}: invalid YAML: {' '.join(str(error).split())}") from error
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of settings, got {type(data).__name__}")

    # The file is checked before the flags apply, so an error names the file when the bad
    # value is in it. A value rejected after this came from a flag.
    config = experiment_config_from_dict(data, source)
    if not overrides:
        return config
    for key, value in overrides.items():
        if key in ("extract", "protocol", "spela", "backprop"):
            # The check above has made sure that each of these sections is a mapping.
            data[key] = {**(data.get(key) or {}), **value}
        else:
            data[key] = value
    return experiment_config_from_dict(data, "command-line flags")


def save_experiment_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML that `load_experiment_config` reads back."""
    text = yaml.safe_dump(experiment_config_to_dict(config), sort_keys=False)
    Path(path).write_text(text, encoding="utf-8")


def _as_tuple(value: object) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(value, str):
        return tuple(item for item in value.replace(",", " ").split() if item)
    return (value,)


def _reject_unknown_keys(data: dict, cls: type, source: str) -> None:
    valid = [f.name for f in fields(cls)]
    unknown = sorted(str(key) for key in data if key not in valid)
    if unknown:
        raise ValueError(
            f"{source}: unknown setting {', '.join(map(repr, unknown))}; "
            f"valid settings: {', '.join(valid)}"
        )
