"""Feature-crossing stack (MaskNet, DCNv2, multi-action head) and the label-weighted BCE."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from features.contract import LABEL_ACTIONS
from training.model.interaction import (
    CrossLayerV2,
    DCNv2,
    InteractionArch,
    InteractionConfig,
    MaskBlock,
    MultiActionHead,
    ParallelMaskNet,
    default_label_weights,
    label_weight_per_head,
    weighted_bce,
)


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 24)  # (B, C, F)
    assert MaskBlock(24, 24, None, 8)(x, x).shape == (2, 5, 8)
    assert MaskBlock(24, 10, 7, 8).aggregate.out_features == 7
    assert MaskBlock(24, 10, None, 8, reduction_ratio=1.5).aggregate.out_features == 15
    assert ParallelMaskNet(24, 3, 8)(x).shape == (2, 5, 24)
    assert CrossLayerV2(24)(x, x).shape == (2, 5, 24)
    assert CrossLayerV2(24, low_rank=4)(x, x).shape == (2, 5, 24)
    assert DCNv2(24, 3, low_rank=2)(x).shape == (2, 5, 24)
    assert MultiActionHead(24, (16, 8), ("a", "b", "c", "d"))(x).shape == (2, 5, 4)
    assert MultiActionHead(24, (), ("a",))(x).shape == (2, 5, 1)
    cfg = InteractionConfig(n_mask_blocks=2, mask_block_dim=8, mlp_hidden=(16,), cross_low_rank=3)
    arch = InteractionArch.from_config(cfg, in_dim=24)
    assert arch(x).shape == (2, 5, len(LABEL_ACTIONS))
    assert arch(x[0]).shape == (5, len(LABEL_ACTIONS))
    assert arch.actions == LABEL_ACTIONS
    assert arch.masknet.out_dim == 16 and arch.cross.dim == 16 and len(arch.cross.layers) == cfg.n_cross_layers


def test_arch_rejects_dims_that_do_not_chain() -> None:
    with pytest.raises(ValueError, match="do not chain"):
        InteractionArch(ParallelMaskNet(8, 2, 5), DCNv2(8, 1), MultiActionHead(8, (4,), ("a",)))


def test_low_rank_cross_equals_full_rank_with_copied_product() -> None:
    torch.manual_seed(0)
    low = CrossLayerV2(12, low_rank=3)
    with torch.no_grad():
        low.u.weight.normal_()
        low.u.bias.normal_()
    full = CrossLayerV2(12)
    with torch.no_grad():
        full.w.weight.copy_(low.u.weight @ low.v.weight)  # W = U Vᵀ
        full.w.bias.copy_(low.u.bias)
    x0, x = torch.randn(6, 12), torch.randn(6, 12)
    torch.testing.assert_close(low(x0, x), full(x0, x), rtol=1e-5, atol=1e-5)
    # and the formula itself: x0 ⊙ (W x + b) + x
    torch.testing.assert_close(full(x0, x), x0 * (x @ full.w.weight.T + full.w.bias) + x)


def test_cross_layer_with_zero_weights_is_identity() -> None:
    for rank in (None, 2):
        layer = CrossLayerV2(10, low_rank=rank)
        with torch.no_grad():
            for p in layer.parameters():
                p.zero_()
        x0, x = torch.randn(4, 10), torch.randn(4, 10)
        assert torch.equal(layer(x0, x), x)
    dcn = DCNv2(10, 3)
    with torch.no_grad():
        for p in dcn.parameters():
            p.zero_()
    x0 = torch.randn(4, 10)
    assert torch.equal(dcn(x0), x0)
    assert torch.equal(DCNv2(10, 0)(x0), x0)


def test_mask_block_mask_multiplies() -> None:
    torch.manual_seed(0)
    blk = MaskBlock(16, 16, None, 8)
    with torch.no_grad():
        blk.ln_out.bias.normal_()  # a constant block output is then visible (not all zeros)
    x1, x2 = torch.randn(5, 16), torch.randn(5, 16)
    assert not torch.allclose(blk(x1, x1), blk(x2, x2))
    with torch.no_grad():
        blk.project.weight.zero_()
        blk.project.bias.zero_()
    assert torch.equal(blk.mask(x1), torch.zeros(5, 16))
    out1, out2 = blk(x1, x1), blk(x2, x2)
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(out1[0], F.relu(blk.ln_out.bias))
    # with a constant mask of ones, the block is ReLU(LN(W LN(x)))
    with torch.no_grad():
        blk.project.bias.fill_(1.0)
    ref = F.relu(blk.ln_out(blk.hidden(blk.ln_in(x1))))
    torch.testing.assert_close(blk(x1, x2), ref)


def test_parallel_masknet_concatenates_blocks_on_the_same_input() -> None:
    torch.manual_seed(0)
    net = ParallelMaskNet(12, 3, 5)
    x = torch.randn(4, 12)
    out = net(x)
    for i, blk in enumerate(net.blocks):
        torch.testing.assert_close(out[:, 5 * i : 5 * (i + 1)], blk(x, x))
    assert (out >= 0).all()


def test_weighted_bce_with_identity_is_plain_bce() -> None:
    g = _g(1)
    logits = torch.randn(7, 3, generator=g)
    labels = (torch.rand(7, 3, generator=g) < 0.5).float()
    labels[0] = 1.0  # several positives at once
    labels[1] = 0.0  # no positive at all
    W = default_label_weights(("click", "save", "hide"))
    assert torch.equal(W, torch.eye(3))
    torch.testing.assert_close(weighted_bce(logits, labels, W), F.binary_cross_entropy_with_logits(logits, labels))
    mask = torch.tensor([True, False, True, True, False, True, True])
    torch.testing.assert_close(
        weighted_bce(logits, labels, W, mask),
        F.binary_cross_entropy_with_logits(logits[mask], labels[mask]),
    )
    # leading batch dims (B, C, A) with a (B, C) mask
    torch.testing.assert_close(
        weighted_bce(logits.view(1, 7, 3), labels.view(1, 7, 3), W, mask.view(1, 7)),
        F.binary_cross_entropy_with_logits(logits[mask], labels[mask]),
    )


def test_weighted_bce_hand_computed() -> None:
    # heads (click, save); a saved example weighs 3 in the click head and 2 in the save head
    W = torch.tensor([[1.0, 3.0], [0.0, 2.0]])
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]])
    labels = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    w = label_weight_per_head(labels, W)
    assert torch.equal(w, torch.tensor([[3.0, 2.0], [1.0, 1.0], [1.0, 1.0]]))

    def bce(z: float, y: float) -> float:
        p = 1 / (1 + math.exp(-z))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    ex0 = (3 * bce(0.0, 1) + 2 * bce(1.0, 1)) / 2
    ex1 = (1 * bce(2.0, 1) + 1 * bce(-1.0, 0)) / 2
    ex2 = (bce(0.5, 0) + bce(0.5, 0)) / 2
    got = weighted_bce(logits, labels, W)
    assert got.item() == pytest.approx((ex0 + ex1 + ex2) / 3, rel=1e-6)
    got_masked = weighted_bce(logits, labels, W, torch.tensor([True, False, True]))
    assert got_masked.item() == pytest.approx((ex0 + ex2) / 2, rel=1e-6)


def test_weighted_bce_errors_and_empty_mask() -> None:
    logits = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="label_weights"):
        weighted_bce(logits, torch.zeros(2, 3), torch.eye(2))
    with pytest.raises(ValueError, match="shape"):
        weighted_bce(logits, torch.zeros(2, 2), torch.eye(3))
    loss = weighted_bce(logits, torch.zeros(2, 3), torch.eye(3), torch.zeros(2, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 3))


def test_config_round_trip_and_unknown_fields() -> None:
    cfg = InteractionConfig(
        n_mask_blocks=2, mask_block_dim=16, cross_low_rank=4, mlp_hidden=(32, 8), dropout=0.1, actions=("a", "b")
    )
    back = InteractionConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert isinstance(back.mlp_hidden, tuple) and isinstance(back.actions, tuple)
    assert InteractionConfig.from_dict(InteractionConfig().to_dict()) == InteractionConfig()
    d = InteractionConfig().to_dict()
    d.update(bogus=1, also_bad=2)
    with pytest.raises(ValueError, match=r"also_bad.*bogus"):
        InteractionConfig.from_dict(d)
    with pytest.raises(ValueError, match="cross_low_rank"):
        InteractionConfig(cross_low_rank=0)
    with pytest.raises(ValueError, match="actions"):
        InteractionConfig(actions=("a", "a"))
    with pytest.raises(ValueError, match="unknown"):
        cfg.replace(nope=1)
    assert cfg.replace(n_cross_layers=0).n_cross_layers == 0


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    for rank in (None, 3):
        cfg = InteractionConfig(n_mask_blocks=2, mask_block_dim=8, mlp_hidden=(16,), cross_low_rank=rank)
        arch = InteractionArch.from_config(cfg, in_dim=20)
        x = torch.randn(4, 6, 20)
        labels = (torch.rand(4, 6, len(cfg.actions)) < 0.3).float()
        W = default_label_weights(cfg.actions)
        W[0, 1] = 2.0
        weighted_bce(arch(x), labels, W).backward()
        for name, p in arch.named_parameters():
            assert p.grad is not None, name
            assert p.grad.abs().sum() > 0, name
