"""White-box watermarks (WaterMAS, Uchida): embedding, attacks, extraction from deployed integers.

``keys``      the secret (positions / projection seed, bits) in a key file, never in the model
``layers``    a model's or a bundle's dot layers as one chain of named weight tensors
``watermas``  WaterMAS: sign-coded substitution + sharpness-aware maximization
``uchida``    Uchida et al. 2017: projection regulariser on one layer's mean kernel
``markers``   a key bound to a model with the strengths recorded in the key (it takes part in
              :func:`models.training.train`: embedding, QAT deployment; fine-tuning attacks without one)
``extract``   bits and bit error rate from any ``{layer: weight}`` (float or integers)
``attacks``   Gaussian noise, magnitude pruning
``permute``   function-preserving neuron permutation (models and bundles)
``obfuscate`` function-preserving scaling, sign flips, split and dummy neurons (models and bundles)
``resync``    re-synchronization against the reference ("Find the Lady"): order, sign, scale,
              split copies merged, dummies dropped
``intercept`` the attacker who holds the key: the cheapest moves of the mark
``verify``    matched bits, binomial p-value, thresholds calibrated on null models
``nulls``     unmarked null models (digits classifiers, LIC students), cached
``digits``    the digits classifier as a host; ``study`` its benchmark, ``adversary`` the
              informed-attacker benchmark
``lic``       an LIC student as a host (key in the decoder); ``lic_study`` its benchmark,
              ``lic_adversary`` the informed-attacker benchmark
``report``    JSON, PNG plots and Markdown tables of the studies
"""
