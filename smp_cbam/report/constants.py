"""Names shared by the report's modules."""

GROUP_COLUMNS = ("dataset", "arch", "encoder")
NUMERIC_COLUMNS = (
    "seed",
    "epochs",
    "best_epoch",
    "val_miou",
    "test_miou",
    "untrained_miou",
    "params",
    "latency_ms",
    "train_seconds",
)
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_miou", "val_dice", "lr")
ATTENTION_ORDER = ("none", "scse", "se", "eca", "cbam_channel", "cbam_spatial", "cbam")
BASELINES = ("none", "scse")
CONFIDENCE = 0.95
PLOT_DPIS = (100, 80, 64, 50)
MAX_PNG_BYTES = 200_000
MISSING = "—"
