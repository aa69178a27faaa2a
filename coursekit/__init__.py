"""A practical deep-learning course in JupyterLab, and the library it teaches"""

__version__ = "0.1.0"
