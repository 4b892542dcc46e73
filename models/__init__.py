"""Float and Brevitas-quantized networks: LIC teachers/students, MinConv layers, classifiers."""
