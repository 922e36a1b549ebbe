"""Model compression for the compress stage: each module makes or judges one kind of variant, without Prefect.

    quantization  int8 static (QDQ, calibrated), int8 dynamic (linear layers), fp16 — on the exported ONNX graph
    pruning       structured channel pruning that rebuilds smaller layers; global unstructured magnitude pruning
    finetune      short retraining of a pruned model with kiln's own training loop
    distillation  a smaller student trained on the teacher's softened outputs
    measure       what the report measures: parameters, multiply-accumulates, sparsity, timed onnxruntime runs
    selection     the Pareto front and the policy that picks the variant to ship
    plot          the accuracy-vs-latency scatter PNG
"""
