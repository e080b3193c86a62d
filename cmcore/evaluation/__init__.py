"""How samples are scored and shown, floor 5: FID, IS, precision/recall through torch-fidelity
(metrics), the small digits classifier used as their feature extractor on the embedded data
(classifier), and tables, plots and sample grids (reports).
"""
