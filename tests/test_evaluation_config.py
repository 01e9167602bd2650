"""Experiment configs: YAML loading, flag overrides, validation and the shipped files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from spela_transfer.config import (
    ExperimentConfig,
    ProtocolConfig,
    experiment_config_from_dict,
    experiment_config_to_dict,
    load_experiment_config,
    parse_seeds,
    save_experiment_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_equal_demo_yaml():
    demo = load_experiment_config(CONFIGS / "demo.yaml")

    assert demo == ExperimentConfig(
        out=demo.out, epochs=demo.epochs, protocol=demo.protocol, extract=demo.extract
    )
    assert demo.extract.backbone == "efficientnet_lite0.offline"
    assert demo.extract.dataset == "fashion-mnist-sample"
    assert 0.1 in demo.protocol.test_sizes
    assert len(demo.seeds) == 3
    assert demo.heads == ("spela", "backprop", "logreg")


def test_paper_transfer_yaml_is_reference_protocol():
    config = load_experiment_config(CONFIGS / "paper-transfer.yaml")

    assert config.extract.backbone == "resnet50.tv_in1k"
    assert config.extract.limit is None
    assert config.hidden_widths is None
    assert config.epochs == 50
    assert config.batch_size == 32
    assert config.lr == 1e-3
    assert config.protocol.names == ("test-size",)
    assert config.protocol.test_sizes == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
    assert config.protocol.split_seed == 100
    assert config.protocol.stratify is False
    assert len(config.seeds) == 5
    assert config.threads is None


def test_named_backbone_keeps_input_size():
    # The demo's 64 pixels apply only while no backbone is named.
    paper = load_experiment_config(CONFIGS / "paper-transfer.yaml")
    overridden = load_experiment_config(
        CONFIGS / "paper-transfer.yaml", {"extract": {"backbone": "efficientnet_lite0.offline"}}
    )
    by_flag = load_experiment_config(None, {"extract": {"backbone": "resnet18"}})
    sized = load_experiment_config(None, {"extract": {"backbone": "resnet18", "image_size": 96}})

    assert paper.extract.image_size is None
    assert overridden.extract.image_size is None
    assert by_flag.extract.image_size is None
    assert sized.extract.image_size == 96
    assert load_experiment_config(None).extract.image_size == 64
    assert load_experiment_config(CONFIGS / "demo.yaml").extract.image_size == 64


def test_few_shot_yaml():
    config = load_experiment_config(CONFIGS / "few-shot.yaml")

    assert config.protocol.k_shots == (1, 5, 10, 20)
    assert config.protocol.test_sizes == (0.95, 0.99)
    assert config.epochs <= 5
    assert config.extract == load_experiment_config(CONFIGS / "demo.yaml").extract


def test_overrides_replace_file_values(tmp_path):
    path = tmp_path / "experiment.yaml"
    path.write_text(
        "extract: {dataset: cifar10, backbone: resnet50.tv_in1k}\n"
        "protocol: {test_sizes: [0.1, 0.9], split_seed: 100}\n"
        "epochs: 50\n"
    )

    config = load_experiment_config(
        path, {"epochs": 3, "extract": {"limit": 10}, "protocol": {"test_sizes": (0.5,)}}
    )

    assert config.epochs == 3
    assert config.extract.dataset == "cifar10"
    assert config.extract.limit == 10
    assert config.protocol.test_sizes == (0.5,)
    assert config.protocol.split_seed == 100


def test_saved_config_round_trips(tmp_path):
    config = ExperimentConfig(seeds=(4, 5), hidden_widths=(32, 16), spela={"loss": "neg_cos"})

    save_experiment_config(config, tmp_path / "config.yaml")

    assert load_experiment_config(tmp_path / "config.yaml") == config
    assert experiment_config_from_dict(experiment_config_to_dict(config)) == config


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ([0, 1, 2], (0, 1, 2)),
        ("0,1,2", (0, 1, 2)),
        ("0 1  2", (0, 1, 2)),
        (["3", "4"], (3, 4)),
        (7, (7,)),
    ],
)
def test_parse_seeds_accepts_lists_and_strings(text, expected):
    assert parse_seeds(text) == expected


@pytest.mark.parametrize("value", ["0,a", [1.5], [True], "0.5", [None]])
def test_parse_seeds_rejects_non_integers(value):
    with pytest.raises(ValueError, match="seeds must be whole numbers such as 0, 1, 2"):
        parse_seeds(value)


def test_yaml_seeds_as_string(tmp_path):
    path = tmp_path / "seeds.yaml"
    path.write_text('seeds: "0, 1, 2"\n')

    assert load_experiment_config(path).seeds == (0, 1, 2)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"heads": ("spela", "svm")}, r"unknown heads 'svm'; valid heads: spela, backprop, logreg"),
        ({"heads": ()}, "heads must list at least one of"),
        ({"heads": ("spela", "spela")}, "heads must not repeat a value"),
        ({"seeds": ()}, "seeds must list at least one integer seed"),
        ({"seeds": (-1,)}, "seeds must be integers of 0 or more, got -1"),
        ({"seeds": (1, 1)}, "seeds must not repeat a value"),
        ({"epochs": 0}, "epochs must be a positive integer, got 0"),
        ({"lr": -1.0}, "lr must be a positive number, got -1.0"),
        ({"hidden_widths": (64, 0)}, "hidden_widths must be positive integers or null"),
        ({"spela": [1]}, "spela must be a mapping of head settings"),
        ({"threads": 0}, "threads must be a positive integer or null, got 0"),
    ],
)
def test_experiment_config_rejects(settings, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig(**settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"names": ("test-size", "episodes")}, r"unknown protocols 'episodes'; valid protocols"),
        ({"test_sizes": (0.1, 1.0)}, "test size must be a fraction strictly between 0 and 1"),
        ({"test_sizes": (0.0,)}, r"got 0.0"),
        ({"test_sizes": ("0.5",)}, "got '0.5'"),
        ({"test_sizes": (0.5, 0.5)}, "test_sizes must not repeat a value"),
        ({"test_sizes": ()}, "test_sizes must not be empty"),
        ({"k_shots": (0,)}, "k-shot must be a positive integer, got 0"),
        ({"k_shots": (5, 5)}, "k_shots must not repeat a value"),
        ({"k_shots": ()}, "k_shots must not be empty"),
        ({"k_shot_test_size": 1.2}, "k_shot_test_size must be a fraction"),
        ({"split_seed": "100"}, "split_seed must be an integer, got '100'"),
        ({"stratify": "yes"}, "stratify must be true or false, got 'yes'"),
    ],
)
def test_protocol_config_rejects(settings, message):
    with pytest.raises(ValueError, match=message):
        ProtocolConfig(**settings)


def test_unknown_yaml_key_lists_valid_keys(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("epoch: 5\n")

    with pytest.raises(ValueError, match=r"unknown setting 'epoch'; valid settings: extract,"):
        load_experiment_config(path)


def test_unknown_nested_key_names_section(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("protocol: {test_size: [0.1]}\n")

    with pytest.raises(ValueError, match=r"protocol: unknown setting 'test_size'"):
        load_experiment_config(path)


def test_section_must_be_mapping(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("protocol: [0.1]\n")

    with pytest.raises(ValueError, match=r"'protocol' must be a mapping, got \[0.1\]"):
        load_experiment_config(path)


def test_yaml_must_be_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")

    with pytest.raises(ValueError, match="expected a mapping of settings, got list"):
        load_experiment_config(path)


def test_invalid_yaml_reported(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("epochs: [1,\n")

    with pytest.raises(ValueError, match="invalid YAML"):
        load_experiment_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file .*missing.yaml' not found"):
        load_experiment_config(tmp_path / "missing.yaml")


def test_override_section_must_be_mapping(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text(yaml.safe_dump({"extract": "cifar10"}))

    with pytest.raises(ValueError, match="'extract' must be a mapping, got 'cifar10'"):
        load_experiment_config(path, {"extract": {"limit": 1}})


def test_data_must_be_mapping():
    with pytest.raises(ValueError, match="expected a mapping of settings, got str"):
        experiment_config_from_dict("epochs: 3")
