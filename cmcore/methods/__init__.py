"""What is trained, floor 3: the losses (objectives: EDM, CD, CT, PD; ict, ect, continuous),
the distances they compare with (distances) and the registry of training methods (registry:
what each method trains, whether it needs a teacher or keeps a target network, its per-step
loss). Built on the maths of ``cmcore.diffusion``; never imports a network or the loop.
"""
