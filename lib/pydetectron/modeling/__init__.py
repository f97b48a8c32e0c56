"""Model pieces: bodies (ResNet, FPN), RPN, ROI heads, targets and the detector that wires them.

Builders register themselves by name in ``pydetectron.modeling.registry`` when their module is imported;
``registry.import_builtin_modules()`` imports the built-in ones. Nothing heavy is imported here.
"""
