"""The LMU-attention CTC model: LMU math (lmu.py), encoder, CTC head/loss (asr.py) and decoding (decode.py)."""

from lmu_asr.model.asr import LMUASR, count_flops, ctc_loss
from lmu_asr.model.decode import greedy_decode, prefix_beam_search
from lmu_asr.model.lmu import LegendreMemory, LMULayer, lmu_matrices

__all__ = ["LMUASR", "LegendreMemory", "LMULayer", "count_flops", "ctc_loss", "greedy_decode", "lmu_matrices",
           "prefix_beam_search"]
