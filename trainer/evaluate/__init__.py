"""Held-out evaluation: `inputs` (what to edit), `compare` (sample and compare models on the same
noise), `metrics` (L2 outside the mask, CLIP, every scorer with its details)."""
