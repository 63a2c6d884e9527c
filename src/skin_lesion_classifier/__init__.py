"""skin-lesion-classifier: train, evaluate, explain and serve HAM10000 dermoscopy classifiers."""

__version__ = "0.1.0"
