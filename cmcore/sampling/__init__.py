"""How a trained model is used, floor 5: one-step and multistep consistency sampling and DDIM
for PD (samplers), the greedy search of the multistep times (tau_search) and zero-shot editing
(editing). Models are rebuilt from checkpoints with ``cmcore.models``, not the training loop.
"""
