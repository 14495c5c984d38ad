"""Names shared by the report's modules."""

# runs are compared within one of these groups (the columns present in the results)
GROUP_COLUMNS = ("dataset", "arch", "encoder", "placement")
# the columns that name one run; a results row repeated with the same key is a rerun
RUN_KEY_COLUMNS = (*GROUP_COLUMNS, "attention", "seed")
NUMERIC_COLUMNS = (
    "seed",
    "epochs",
    "steps",
    "best_epoch",
    "val_miou",
    "test_miou",
    "test_context_miou",
    "val_context_miou",
    "untrained_miou",
    "params",
    "latency_ms",
    "train_seconds",
)
BOOL_COLUMNS = ("converged", "at_floor")
TEXT_COLUMNS = ("status", "stop_reason", "placement", "precision", "failure", "run_dir")
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_miou", "val_dice", "lr")
COST_COLUMNS = ("arch", "encoder", "attention", "placement", "params", "latency_ms")
ATTENTION_ORDER = (
    "none",
    "scse",
    "se",
    "eca",
    "cbam_channel",
    "cbam_spatial",
    "cbam",
    "cbam_residual",
)
BASELINES = ("none", "scse")
CONFIDENCE = 0.95
# a difference "holds" when its Holm-adjusted p-value is below this
ALPHA = 0.05
# the seed t-test marks differences only from this many paired seeds on: with two, the interval is
# the mean ± t(0.975, 1) = 12.7 standard errors and the standard error itself rests on one difference
MIN_SEEDS_FOR_TEST = 3
N_BOOTSTRAP = 2000
BOOTSTRAP_SEED = 0
PLOT_DPIS = (100, 80, 64, 50)
MAX_PNG_BYTES = 200_000
MISSING = "—"
