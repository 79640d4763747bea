"""The Airflow Assets that chain the DAGs by data: each names one dataset under ``$AFM_HOME``.

``activity_features`` produces the feature assets for its day; ``foundation_pretrain`` is
scheduled on the corpus, ``ranker_finetune`` on the backbone it produces, and
``publish_serving`` on the ranker. Every event carries ``{"ds": day}`` in its extra
(:func:`afm.orchestration.afm_step`).
"""

from __future__ import annotations

from airflow.sdk import Asset

USER_SEQUENCES = Asset(name="user_sequences", uri="afm://features/user_sequences", group="features")
RANKING_EXAMPLES = Asset(name="ranking_examples", uri="afm://features/ranking_examples", group="features")
PRETRAIN_CORPUS = Asset(name="pretrain_corpus", uri="afm://features/pretrain_corpus", group="features")
FEAST_ONLINE = Asset(name="feast_online", uri="afm://features/feast_online", group="features")
PINFM_BACKBONE = Asset(name="pinfm_backbone", uri="afm://models/pinfm", group="models")
RANKER = Asset(name="ranker", uri="afm://models/ranker", group="models")
SERVED_MODEL = Asset(name="served_model", uri="afm://serving/current", group="serving")
