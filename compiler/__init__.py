"""The driver: capture, the pass pipeline and its verification, lowering, and everything around it.

    optimize.py  optimize(): the public entry point
    core/        capture, the pass pipeline, verification, the optimized module, errors, torch.compile backend
    int8/        calibration, the int8 plan (what stays fp32 and why), the accuracy budget
    deploy/      saving and loading without pickle, ONNX export
    workflow/    pruning, data-parallel fine-tuning, recipe tuning, the demo
    ui/          the command line, pass-by-pass dumps, the HTML explorer

The public names live on the ``graphopt`` package itself (``graphopt.optimize``, ``graphopt.load``, ...).
"""
