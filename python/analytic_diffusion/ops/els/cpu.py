"""Compiled CPU backend of ``els_denoise`` (csrc/cpu/els.cpp); registers itself here."""
