"""Where models and data come from: timm names, local checkpoints, custom modules, data sets.

Never imports :mod:`surgery`.
"""
