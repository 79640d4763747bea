"""Named training recipes: the objective, optimiser and item-embedding settings that measured best.

A recipe says *how* PinFM learns, whatever its size: how items are scored (dot product or
cosine), where negatives come from and how they are corrected (log-Q), which losses train
it, the learning rate, and how items are embedded (hash tables). The benchmark
(:class:`training.bench.seqrec.SeqRecConfig`, whose defaults are the ``pinfm`` recipe) and
the pipeline's pretraining (:class:`training.jobs.pretrain.PretrainConfig`) both build
from one, so a setting the benchmark measures better reaches the pipeline by changing it
here.

A size (a preset of the benchmark or of the pipeline) may scale what depends on the
machine and the data: the batch, the steps, the sampled negatives, the pairs per step, the
in-batch cap (down, never up), which losses are on, and the hash buckets. What makes the
recipe (:data:`KIND_FIELDS`: the similarity, the sampler and its log-Q correction, the
multi-token window, the start temperature, …) stays the same; :meth:`Recipe.objective_config`
refuses to change it, and a size that departs from the recipe elsewhere says why in its
docstring.

Example:
    >>> r = recipe("pinfm")
    >>> r.objective.similarity, r.objective.sampler, r.lr
    ('dot', 'popularity', 0.0015)
    >>> r.objective_config(negatives=256).negatives
    256
"""

from __future__ import annotations

from features.settings import Settings
from training.model.objectives import ObjectiveConfig

#: ObjectiveConfig fields a size may change: what scales with the machine and the data
SIZE_FIELDS: tuple[str, ...] = (
    "negatives",
    "in_batch_max",
    "max_pairs",
    "next_token",
    "multi_token",
    "future_token",
    "future_window",
    "catalog_matmul",
)
#: ObjectiveConfig fields that make a recipe what it is: every size keeps them
KIND_FIELDS: tuple[str, ...] = tuple(name for name in ObjectiveConfig.model_fields if name not in SIZE_FIELDS)


class Recipe(Settings):
    """One named way to train PinFM.

    Attributes:
        name: the key in :data:`RECIPES`.
        objective: the losses and negatives at the benchmark's scale.
        lr: peak learning rate (AdamW, and the hash tables' lazy Adam when they are sparse).
        weight_decay: AdamW decay of the matrix weights.
        adam_beta2: second-moment decay of the Adams.
        n_hash_tables: item-id hashes, each with its own sub-table of ``d_model / n_hash_tables`` columns.
        hash_buckets: rows per sub-table.
        sparse_item_grads: the hash tables get sparse gradients (lazy Adam): a step costs the
            same whatever the table size.
        scale_item_input: the item part of the input tokens is multiplied by √d_model.
        measured: where the recipe was measured, and how well.
    """

    name: str
    objective: ObjectiveConfig
    lr: float
    weight_decay: float
    adam_beta2: float
    n_hash_tables: int
    hash_buckets: int
    sparse_item_grads: bool
    scale_item_input: bool
    measured: str

    def objective_config(self, **sizes: object) -> ObjectiveConfig:
        """The recipe's objective with some :data:`SIZE_FIELDS` changed for a size.

        Raises:
            ValueError: a field is not a size field (it would change the recipe), or the
                in-batch cap would rise above the recipe's.
        """
        kind = sorted(set(sizes) - set(SIZE_FIELDS))
        if kind:
            raise ValueError(
                f"{kind} define the {self.name!r} recipe, a size cannot change them (size fields: {list(SIZE_FIELDS)})"
            )
        cap = sizes.get("in_batch_max", self.objective.in_batch_max)
        if self.objective.in_batch_max is not None and (cap is None or cap > self.objective.in_batch_max):
            raise ValueError(
                f"in_batch_max={cap} is above the {self.name!r} recipe's cap {self.objective.in_batch_max}"
            )
        return self.objective.replace(**sizes)

    def departures(self, objective: ObjectiveConfig) -> dict[str, tuple[object, object]]:
        """{field: (the recipe's value, ``objective``'s)} for every :data:`KIND_FIELDS` field that differs."""
        mine, theirs = self.objective.to_dict(), objective.to_dict()
        return {k: (mine[k], theirs[k]) for k in KIND_FIELDS if mine[k] != theirs[k]}


PINFM = Recipe(
    name="pinfm",
    objective=ObjectiveConfig(
        next_token=1.0,
        multi_token=1.0,
        multi_token_window=3,
        similarity="dot",
        negatives=1024,
        in_batch_max=1024,
        sampler="popularity",
        logq_correction=True,
    ),
    lr=1.5e-3,
    weight_decay=0.0,
    adam_beta2=0.999,
    n_hash_tables=2,
    hash_buckets=1 << 21,
    sparse_item_grads=True,
    scale_item_input=True,
    measured=(
        "Amazon Beauty, full ranking, history 50 (docs/experiments/beauty-seqrec.md, beauty-tuning.md): "
        "next- + multi-token (L' = 3) losses, dot-product scores, in-batch (<= 1,024) + 1,024 popularity "
        "negatives with log-Q, 2 x 2^21 sparse hash buckets, scaled item input, lr 1.5e-3: "
        "test NDCG@10 0.0331 (six-seed mean 0.0330) against the best published SASRec's 0.0327"
    ),
)

#: every recipe by name; the default is the best one measured
RECIPES: dict[str, Recipe] = {PINFM.name: PINFM}
DEFAULT_RECIPE = PINFM.name


def recipe(name: str = DEFAULT_RECIPE) -> Recipe:
    """The recipe called ``name``; ValueError naming the known ones otherwise."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[name]
