"""Model inputs: the GDP-HMM model grid, the seven normalised modalities, beam/angle plates."""

from engine.features.modalities import N_SLOTS, ModelInputs, Slot, build_modalities
from engine.features.model_grid import (
                                        MODEL_SHAPE,
                                        MODEL_SPACING,
                                        ModelGridTransform,
                                        model_geometry,
)
from engine.features.normalization import Normalization
from engine.features.plates import angle_plate, beam_plate, plan_plates

__all__ = ["MODEL_SHAPE", "MODEL_SPACING", "N_SLOTS", "ModelGridTransform", "ModelInputs",
           "Normalization", "Slot", "angle_plate", "beam_plate", "build_modalities",
           "model_geometry", "plan_plates"]
