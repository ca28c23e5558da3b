"""surgery: cut pretrained networks into blocks, find equivalent blocks, reassemble them under budgets.

Entry points: ``import surgery`` (this module) and the ``surgery`` command (:mod:`surgery.cli`).
"""

__version__ = "0.1.0"
