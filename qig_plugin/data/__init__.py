"""Calibration data: shipped real photos and texts, and their conversion to oneshot datasets."""

from qig_plugin.data.calibration import (
    CalibrationRecord,
    batch_one_collator,
    build_calibration_dataset,
    load_photo,
    shipped_records,
    shipped_text_records,
)

__all__ = [
    "CalibrationRecord",
    "batch_one_collator",
    "build_calibration_dataset",
    "load_photo",
    "shipped_records",
    "shipped_text_records",
]
