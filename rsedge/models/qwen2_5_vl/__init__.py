"""Qwen2.5-VL: dynamic-resolution vision tower with window attention, Qwen2.5 decoder with multimodal rotary."""
