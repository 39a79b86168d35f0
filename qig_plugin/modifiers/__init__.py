"""Thin llm-compressor modifiers that feed QIG token weights into stock calibration."""

from qig_plugin.modifiers.mbq import MBQModifier
from qig_plugin.modifiers.qig_autoround import QIGAutoRoundModifier
from qig_plugin.modifiers.qig_awq import QIGAWQModifier
from qig_plugin.modifiers.qig_gptq import QIGGPTQModifier
from qig_plugin.modifiers.qig_smoothquant import QIGSmoothQuantModifier

from qig_plugin.registry import register_modifiers

__all__ = ["MBQModifier", "QIGAWQModifier", "QIGAutoRoundModifier", "QIGGPTQModifier", "QIGSmoothQuantModifier"]

register_modifiers()
