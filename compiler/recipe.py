"""The validated recipe as frozen dataclasses (defaults applied, nothing resolved yet).

The classes are generated from the recipe's JSON Schema (runtime/recipe.schema.json) by
runtime/sections.py: one keyword-only frozen dataclass per object of the schema, a field per
key with the schema's name, type and default. A recipe key is declared once, in the schema.
Built by `validate.validate()` from the loaded dict once it passed the JSON Schema; every
later stage reads these, never the raw dict.

A few values are normalized before the build (compiler/validate.py): model.weights 'none' ->
None, data.path / data.source / data.text_field rewritten into data.sources / data.format /
data.fields.text, data.format and data.overlong resolved, run_dir defaulted to runs/<name>,
tp.plan, data.roles and cluster.env sorted (cluster.env values as strings).
"""
from __future__ import annotations

from meshbake.runtime.sections import section

Recipe = section("")
ModelSection = section("model")
MeshSection = section("mesh")
TPSection = section("tp")
ClusterSection = section("cluster")
TrainSection = section("train")
MixedPrecisionSection = section("train.mixed_precision")
DataSection = section("data")
DataFieldsSection = section("data.fields")
Source = section("data.sources[]")
CheckpointSection = section("checkpoint")
LoraSection = section("lora")
TrackingSection = section("tracking")
WandbSection = section("tracking.wandb")
