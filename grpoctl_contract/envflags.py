"""The seed SOP's env flags and the trainer config keys they switch on (docs/trainer-config.md).

The trainer maps them onto its config; the laptop maps a run's `-e`/SOP `env:` flags onto the same keys
so that the preflight compiles the config the run will really have."""

ENV_FLAGS = {"EVAL_FULL_SWEEP": "eval_full_sweep", "PRINT_TRAIN_TIME_BREAKDOWN": "print_time_breakdown"}
