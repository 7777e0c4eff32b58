"""Model family: the metaseq decoder (parents, JAM-Uniform, JAM-Width) and JAM-Cross."""
