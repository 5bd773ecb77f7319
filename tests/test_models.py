import json
import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from bict_ray.core.models import (CosineClassifier, EmbeddingNet, LinearClassifier, UpgradeTransform, build_backbone,
                             classifier_logits)


def _randomise_batchnorm(model: nn.Module) -> None:
    """Give BN running stats non-default values so that a round-trip that lost them would show."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)


def test_embedding_net_outputs_features_logits_and_unit_embeddings():
    torch.manual_seed(0)
    net = EmbeddingNet(embedding_dim=16, num_classes=10).eval()
    x = torch.randn(4, 1, 28, 28)
    features, logits = net(x)
    assert features.shape == (4, 16) and logits.shape == (4, 10)
    emb = net.embed(x)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(emb, features / features.norm(dim=1, keepdim=True))
    # cosine classifier: logits bounded by the scale
    assert logits.abs().max() <= 16.0 + 1e-4


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 64)])
def test_small_cnn_works_for_other_image_sizes(channels, size):
    backbone, dim = build_backbone("small_cnn", channels, size)
    assert dim == 128
    assert backbone(torch.randn(2, channels, size, size)).shape == (2, 128)
    assert 100_000 < sum(p.numel() for p in backbone.parameters()) < 1_000_000


def test_resnet18_on_one_channel_28px_uses_cifar_stem():
    backbone, dim = build_backbone("resnet18", 1, 28)
    assert dim == 512
    assert backbone.conv1.in_channels == 1 and backbone.conv1.kernel_size == (3, 3)
    assert backbone.conv1.stride == (1, 1) and isinstance(backbone.maxpool, nn.Identity)
    assert backbone.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 512)


def test_resnet_on_large_images_keeps_imagenet_stem_with_new_channels():
    backbone, dim = build_backbone("resnet50", 1, 96)
    assert dim == 2048
    assert backbone.conv1.in_channels == 1 and backbone.conv1.kernel_size == (7, 7)
    assert isinstance(backbone.maxpool, nn.MaxPool2d) and isinstance(backbone.fc, nn.Identity)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match="small_cnn, resnet18, resnet50"):
        build_backbone("vgg", 1, 28)


def test_backbone_weights_file_initialises_backbone(tmp_path):
    torch.manual_seed(0)
    source, _ = build_backbone("small_cnn", 1, 28)
    _randomise_batchnorm(source)
    path = tmp_path / "backbone.pt"
    torch.save(source.state_dict(), path)
    loaded, _ = build_backbone("small_cnn", 1, 28, weights=str(path))
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(source.eval()(x), loaded.eval()(x))


def test_torchvision_checkpoint_with_fc_head_loads(tmp_path):
    full = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(full.state_dict(), path)
    backbone, _ = build_backbone("resnet18", 3, 224, weights=path)
    assert torch.equal(backbone.conv1.weight, full.conv1.weight)


def test_bad_backbone_weights_name_the_file(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(ValueError, match="missing.pt.*not found"):
        build_backbone("small_cnn", 1, 28, weights=missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt.*not a readable state_dict"):
        build_backbone("small_cnn", 1, 28, weights=corrupt)
    other = tmp_path / "three_channels.pt"
    torch.save(build_backbone("small_cnn", 3, 28)[0].state_dict(), other)
    with pytest.raises(ValueError, match="three_channels.pt.*does not match backbone 'small_cnn'"):
        build_backbone("small_cnn", 1, 28, weights=other)


def test_classifier_logits_by_hand():
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    features = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(classifier_logits("cosine", weight, features, 2.0), torch.tensor([[1.2, 1.6]]))
    torch.testing.assert_close(classifier_logits("linear", weight, features, 2.0), torch.tensor([[3.0, 8.0]]))
    with pytest.raises(ValueError, match="feature dim 3 does not match classifier dim 2"):
        classifier_logits("cosine", weight, torch.ones(1, 3), 2.0)
    with pytest.raises(ValueError, match="unknown classifier 'arc'"):
        classifier_logits("arc", weight, features, 2.0)


def test_classifier_modules_match_the_functional():
    x = torch.randn(5, 4)
    cosine, linear = CosineClassifier(4, 3, scale=8.0), LinearClassifier(4, 3)
    assert cosine.weight.shape == linear.weight.shape == (3, 4)
    assert torch.equal(cosine(x), classifier_logits("cosine", cosine.weight, x, 8.0))
    assert torch.equal(linear(x), x @ linear.weight.T)


@pytest.mark.parametrize("classifier", ["cosine", "linear"])
def test_embedding_net_spec_round_trip(tmp_path, classifier):
    torch.manual_seed(0)
    net = EmbeddingNet(embedding_dim=8, num_classes=5, classifier=classifier, scale=10.0)
    _randomise_batchnorm(net)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    (tmp_path / "model.json").write_text(json.dumps(net.spec))

    spec = json.loads((tmp_path / "model.json").read_text())
    restored = EmbeddingNet.from_spec(spec)
    restored.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    x = torch.randn(3, 1, 28, 28)
    for got, want in zip(restored.eval()(x), net.eval()(x)):
        assert torch.equal(got, want)
    assert restored.spec == net.spec and restored.classifier.kind == classifier


def test_from_spec_refuses_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown keys \['dim'\]"):
        EmbeddingNet.from_spec({"backbone": "small_cnn", "dim": 3})
    with pytest.raises(ValueError, match=r"unknown keys \['width'\]"):
        UpgradeTransform.from_spec({"d_in": 4, "d_out": 4, "width": 8})


def test_upgrade_transform_is_identity_at_init():
    torch.manual_seed(0)
    psi = UpgradeTransform(6, 6, hidden=16)
    x = torch.nn.functional.normalize(torch.randn(10, 6), dim=1)
    assert torch.equal(psi.train()(x), x)
    assert torch.equal(psi.eval()(x), x)


def test_upgrade_transform_shapes_and_layers():
    psi = UpgradeTransform(6, 4, hidden=16, layers=3)
    assert not psi.residual
    assert psi.eval()(torch.randn(5, 6)).shape == (5, 4)
    assert sum(isinstance(m, nn.Linear) for m in psi.modules()) == 4
    with pytest.raises(ValueError, match=r"expects \(N, 6\) input, got \(5, 4\)"):
        psi(torch.randn(5, 4))


@pytest.mark.parametrize("d_out, layers", [(6, 2), (4, 3)])
def test_folded_transform_is_the_eval_transform(d_out, layers):
    """Upgrades run psi with BatchNorm folded into the Linear before it: the same function as eval mode."""
    torch.manual_seed(0)
    psi = UpgradeTransform(6, d_out, hidden=16, layers=layers)
    _randomise_batchnorm(psi)
    for p in psi.parameters():
        nn.init.normal_(p, std=1 / math.sqrt(16))
    x = torch.randn(32, 6)
    psi.eval()
    torch.testing.assert_close(psi.folded()(x), psi(x), rtol=1e-5, atol=1e-6)
    assert psi.folded().spec == psi.spec


def test_upgrade_embeddings_normalises_each_step_in_blocks():
    """Rows beyond one block come out as psi gives them, each step L2-normalised, the input untouched."""
    from bict_ray.core.embed import UPGRADE_BLOCK_ROWS, upgrade_embeddings

    torch.manual_seed(0)
    first, second = UpgradeTransform(6, 6, hidden=16), UpgradeTransform(6, 5, hidden=16)
    for psi in (first, second):
        _randomise_batchnorm(psi)
        nn.init.normal_(psi.mlp[-1].weight, std=0.5)
    x = torch.nn.functional.normalize(torch.randn(UPGRADE_BLOCK_ROWS + 7, 6), dim=1).numpy()
    before = x.copy()
    out = upgrade_embeddings([first, second], x)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(
            second.eval()(torch.nn.functional.normalize(first.eval()(torch.from_numpy(x)), dim=1)), dim=1)
    assert out.shape == (UPGRADE_BLOCK_ROWS + 7, 5) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(x, before)
    assert upgrade_embeddings([first], x[:0]).shape == (0, 6)


def test_bfloat16_upgrade_stays_close_to_float32_and_returns_float32():
    """gallery.upgrade_precision=bfloat16: psi computes in bfloat16, rows stay float32, L2-normalised, near float32's."""
    from bict_ray.core.embed import inference_form, upgrade_embeddings

    torch.manual_seed(0)
    psi = UpgradeTransform(32, 16, hidden=64, layers=2)
    _randomise_batchnorm(psi)
    nn.init.normal_(psi.mlp[-1].weight, std=0.2)
    x = torch.nn.functional.normalize(torch.randn(300, 32), dim=1).numpy()
    exact = upgrade_embeddings([psi], x)
    fast = upgrade_embeddings([psi], x, "bfloat16")
    assert fast.dtype == np.float32 and fast.shape == exact.shape
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-5)
    assert np.abs(fast - exact).max() > 0  # it did compute in bfloat16 ...
    assert (fast * exact).sum(axis=1).min() > 0.999  # ... within its rounding
    assert inference_form(psi, "bfloat16").dtype == torch.bfloat16
    folded = inference_form(psi, "bfloat16")
    np.testing.assert_array_equal(upgrade_embeddings([folded], x, "bfloat16"), fast)  # cast once, reused as is


def test_upgrade_precision_is_checked():
    from bict_ray.core.embed import inference_form, upgrade_embeddings

    with pytest.raises(ValueError, match=r"precision must be one of \['bfloat16', 'float32'\], got 'float16'"):
        upgrade_embeddings([UpgradeTransform(4, 4, hidden=8)], np.eye(4, dtype=np.float32), "float16")
    with pytest.raises(ValueError, match="precision 'bfloat16' applies to UpgradeTransform only"):
        inference_form(nn.Linear(4, 4), "bfloat16")


def test_upgrade_transform_spec_round_trip(tmp_path):
    torch.manual_seed(0)
    psi = UpgradeTransform(6, 6, hidden=16, layers=2)
    _randomise_batchnorm(psi)
    for p in psi.parameters():  # leave the identity init so a lost weight would show
        nn.init.normal_(p, std=1 / math.sqrt(16))
    torch.save(psi.state_dict(), tmp_path / "psi.pt")
    restored = UpgradeTransform.from_spec(json.loads(json.dumps(psi.spec)))
    restored.load_state_dict(torch.load(tmp_path / "psi.pt", weights_only=True))
    x = torch.randn(4, 6)
    assert torch.equal(restored.eval()(x), psi.eval()(x))
    assert not torch.equal(psi(x), x)
