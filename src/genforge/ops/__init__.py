"""Operations: what a team needs around training and serving.

`tracking`: experiment tracking through MLflow (`--track` on pretrain, finetune, align and
eval): parameters, per-step metrics, the loss curve, the config and the resulting model.
`registry`: registered models with versions, aliases (champion, canary) and lineage, in a
directory or in MLflow's model registry; `registry:NAME@ALIAS` wherever a model directory goes.
`lineage`: the record a training command leaves in its run directory (its command, inputs and
their content hashes), which tracking logs and the registry reads.
`hooks`: the seam through which the training loops and evaluation publish their metrics.
`mlflow_store`: where runs go (the default local store) and the check that MLflow is installed.
`routing`, `traffic`: canary / A-B routing of one served name across versions, sticky per user,
with per-version metrics and an outcome log; `ab`: the significance of a difference between
versions from that log.
`drift`, `live_monitor`, `report`: data and output drift against a reference window (MMD, KS,
PSI), as Prometheus gauges in the server and as an HTML/Markdown report.
"""
