"""Tools that look at configs, models and runs from the outside.

evaluate.py     `moge eval`: reports, routing analysis, comparisons (plots.py draws them)
simulate.py     `moge simulate`: the cluster-scale routing simulator
plan.py         `moge plan`: per-device memory of a config on N devices
bench.py        `moge bench`: the layer benchmark (bench_cases.py: what it times)
bench_train.py  the training benchmark against the dense limit and transformers
fingerprint.py  `moge fingerprint`: the intrinsic fingerprint, p-values, plots
docs.py         the README's config reference, generated from the dataclasses
"""
