"""opd-train: on-policy distillation driver (Ray + Megatron-core + SGLang / our CPU engine).

The subpackages form layers; a module imports only from its own layer or the layers below (never upwards), and the
subpackages of one layer never import each other in a cycle (``tests/test_layering.py`` walks every import):

    0  types, http, hf, serialization,   shared types and names, the SGLang-protocol HTTP client, HF dirs, Ray glue,
       lifecycle, extras                 signals -> a clean stop, which extra installs a missing module
    1  config, algo, observability       typed config and the OPD plan; pure-tensor algorithm; logs and plots
    2  teacher, serving, backends        the SGLang teacher client; our CPU engine; the Megatron trainer
    3  rollout                           engines, data, rewards, the OPD reward hooks, the rollout manager
    4  orchestration                     Ray: the runtime, the trainer group, config -> backend settings, a step
    5  train                             the training loop
    6  toy, cli                          the built-in experiment, the command line
"""
LAYERS = (("types", "http", "hf", "serialization", "lifecycle", "extras"), ("config", "algo", "observability"),
          ("teacher", "serving", "backends"), ("rollout",), ("orchestration",), ("train",), ("toy", "cli"))
