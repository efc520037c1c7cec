"""composites' Lightning callbacks, each a base class here; the callbacks themselves are declared per package.

``composites.training.<Name>`` (``pytorch_lightning``) and ``composites.training.lightning.<Name>``.
"""
