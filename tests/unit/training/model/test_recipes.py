"""Training recipes (training/model/recipes.py): the pinned values, what a size may change, the backbone presets."""

from __future__ import annotations

import pytest

from training.model.backbone import PinFMConfig
from training.model.recipes import DEFAULT_RECIPE, KIND_FIELDS, PINFM, RECIPES, SIZE_FIELDS, recipe


def test_the_default_recipe_is_the_measured_one() -> None:
    r = recipe()
    assert DEFAULT_RECIPE == "pinfm" and r is PINFM and RECIPES == {"pinfm": PINFM}
    o = r.objective
    assert (o.similarity, o.sampler, o.logq_correction) == ("dot", "popularity", True)
    assert (o.next_token, o.multi_token, o.multi_token_window, o.future_token) == (1.0, 1.0, 3, 0.0)
    assert (o.in_batch_negatives, o.in_batch_max, o.negatives, o.init_temperature) == (True, 1024, 1024, 0.05)
    assert (r.n_hash_tables, r.hash_buckets, r.sparse_item_grads, r.scale_item_input) == (2, 1 << 21, True, True)
    assert (r.lr, r.weight_decay, r.adam_beta2) == (1.5e-3, 0.0, 0.999)
    with pytest.raises(ValueError, match=r"unknown recipe 'sasrec'; expected one of \['pinfm'\]"):
        recipe("sasrec")


def test_a_size_scales_the_objective_but_cannot_change_its_kind() -> None:
    small = PINFM.objective_config(negatives=256, max_pairs=1024, in_batch_max=512, future_token=0.5)
    assert (small.negatives, small.max_pairs, small.in_batch_max, small.future_token) == (256, 1024, 512, 0.5)
    assert PINFM.departures(small) == {}
    assert set(KIND_FIELDS) & set(SIZE_FIELDS) == set() and {"similarity", "sampler", "multi_token_window"} <= set(
        KIND_FIELDS
    )
    with pytest.raises(ValueError, match=r"\['sampler', 'similarity'\] define the 'pinfm' recipe"):
        PINFM.objective_config(similarity="cosine", sampler="uniform")
    with pytest.raises(ValueError, match="in_batch_max=2048 is above the 'pinfm' recipe's cap 1024"):
        PINFM.objective_config(in_batch_max=2048)
    with pytest.raises(ValueError, match="in_batch_max=None"):  # no cap at all is above the cap too
        PINFM.objective_config(in_batch_max=None)
    legacy = PINFM.objective.replace(similarity="cosine", sampler="uniform", multi_token_window=4)
    assert PINFM.departures(legacy) == {
        "similarity": ("dot", "cosine"),
        "sampler": ("popularity", "uniform"),
        "multi_token_window": (3, 4),
    }


def test_backbone_presets_hash_items_as_the_recipe() -> None:
    sizes = {n: PinFMConfig.preset(n) for n in ("tiny", "small", "base", "large")}
    assert all(c.n_hash_tables == PINFM.n_hash_tables for c in sizes.values())
    assert sizes["base"].hash_buckets == sizes["large"].hash_buckets == PINFM.hash_buckets
    # the CPU sizes keep fewer buckets (the preset's docstring says why)
    assert (sizes["tiny"].hash_buckets, sizes["small"].hash_buckets) == (1024, 8192)
    assert "2 × 8,192" in PinFMConfig.preset.__doc__ and "2 × 1,024" in PinFMConfig.preset.__doc__
