"""PanGu-Sigma (arXiv 2303.10845): two-level Random Routed Experts and domain sub-models.

- `moge.sigma.routing`: level 1 (a domain's expert groups) and level 2 (a fixed random
  token-id table inside them), as pure functions; the layer uses them when
  `MoGEConfig.rre_domain_groups` is set.
- `moge.sigma.domains`: domain specs of the data config (`data.domains`) and the
  built-in corpus's topic families.
- `moge.sigma.data`: a token dataset whose batches carry each sequence's domain id.
- `moge.sigma.extract`: `moge extract RUN --domain D OUT`, a domain's sub-model.

Nothing here is imported by `import moge`; import the submodules.
"""
