"""Reward modules: plain functions ``(completions, **context) -> list[float]`` that score answers.

Rule-based rewards live in the environments today (each env's ``step`` returns its task reward, and
``agents/ppo.py`` adds the invalid-answer penalty). This package is where CLIP AI-feedback and learned
reward models will join, as composable functions in the style of TRL's reward functions.
"""
