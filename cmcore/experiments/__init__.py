"""The paper's studies, floor 6: the Fig. 3 ablations (ablations), Theorems 1 and 2 on an exact
Gaussian mixture (theorem), the speed benchmark (bench) and the editing grids (edit_demos).
Each composes the layers below; only the CLI imports them.
"""
