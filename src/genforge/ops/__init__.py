"""Operations: what a team needs around training and serving.

`tracking`: experiment tracking through MLflow (`--track` on pretrain, finetune, align and
eval): parameters, per-step metrics, the loss curve, the config and the resulting model.
`registry`: registered models with versions, aliases (champion, canary) and lineage, in a
directory or in MLflow's model registry; `registry:NAME@ALIAS` wherever a model directory goes.
`lineage`: the record a training command leaves in its run directory (its command, inputs and
their content hashes), which tracking logs and the registry reads.
`hooks`: the seam through which the training loops and evaluation publish their metrics.
`mlflow_store`: where runs go (the default local store) and the check that MLflow is installed.
"""
