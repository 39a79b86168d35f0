"""Thin llm-compressor modifiers that feed QIG token weights into stock calibration."""

from qig_plugin.modifiers.qig_gptq import QIGGPTQModifier

__all__ = ["QIGGPTQModifier"]
