"""Config-driven fine-tuning experiments that compare jaxlora's methods on real models.

The library never imports this package. Each module in ``experiments.configs`` has a
``get_config(variant)`` returning an :class:`experiments.config.ExperimentConfig`;
``python -m experiments.run`` runs one config, ``python -m experiments.compare`` runs
several and writes one results table and the plots.
"""
