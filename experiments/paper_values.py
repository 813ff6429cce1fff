"""The paper's numbers (seed 000), kept as data for the report's side-by-side columns."""

# Table 4 (translation, SGD trajectory) and Table 6 (translation, Adam trajectory): mean ratio
# of directional sharpness to SGD over 3 runs, per probe epoch. Table 1 is Table 4's epoch 2,
# first run.
SHARPNESS_RATIO = {
    ("translation", "sgd"): {
        2: {"sgd": 1.0, "sgd, clip grad 0.1": 0.047986, "adam": 0.023446,
            "adam, clip grad 0.5": 5.27e-5, "adam, clip update 0.5": 0.017012,
            "adafactor": 5.1e-6, "adafactor, clip grad 0.5": 1.7e-8, "lion": 0.010675,
            "lion, clip update 0.5": 0.019431, "sign sgd": 0.007252,
            "normalized sgd": 0.065037, "normalized sgd, clip grad 0.1": 0.016273},
        5: {"sgd": 1.0, "sgd, clip grad 0.1": 0.007037, "adam": 0.002392,
            "adam, clip grad 0.5": 1.22e-5, "adam, clip update 0.5": 0.001686,
            "adafactor": 8.0e-7, "adafactor, clip grad 0.5": 4.11e-9, "lion": 0.001052,
            "lion, clip update 0.5": 0.001908, "sign sgd": 0.001172,
            "normalized sgd": 0.013729, "normalized sgd, clip grad 0.1": 0.00279},
        10: {"sgd": 1.0, "sgd, clip grad 0.1": 0.038694, "adam": 0.01121,
             "adam, clip grad 0.5": 5.57e-5, "adam, clip update 0.5": 0.008748,
             "adafactor": 3.0e-6, "adafactor, clip grad 0.5": 1.6e-8, "lion": 0.005257,
             "lion, clip update 0.5": 0.00952, "sign sgd": 0.005839,
             "normalized sgd": 0.054007, "normalized sgd, clip grad 0.1": 0.01284},
        20: {"sgd": 1.0, "sgd, clip grad 0.1": 0.026754, "adam": 0.00741,
             "adam, clip grad 0.5": 5.3e-5, "adam, clip update 0.5": 0.005993,
             "adafactor": 1.68e-6, "adafactor, clip grad 0.5": 1.36e-8, "lion": 0.003932,
             "lion, clip update 0.5": 0.007098, "sign sgd": 0.003965,
             "normalized sgd": 0.037828, "normalized sgd, clip grad 0.1": 0.00886},
    },
    ("translation", "adam"): {
        2: {"sgd": 1.0, "sgd, clip grad 0.1": 0.003363, "adam": 0.00364,
            "adam, clip grad 0.5": 6.18e-5, "adam, clip update 0.5": 0.003118,
            "adafactor": 4.45e-7, "adafactor, clip grad 0.5": 1.49e-8, "lion": 0.001377,
            "lion, clip update 0.5": 0.002448, "sign sgd": 0.000722, "normalized sgd": 0.010809},
        5: {"sgd": 1.0, "sgd, clip grad 0.1": 0.002501, "adam": 0.000263,
            "adam, clip grad 0.5": 3.94e-6, "adam, clip update 0.5": 0.000823,
            "adafactor": 1.7e-7, "adafactor, clip grad 0.5": 3.47e-9, "lion": 0.000369,
            "lion, clip update 0.5": 0.000644, "sign sgd": 0.000485, "normalized sgd": 0.004136},
        10: {"sgd": 1.0, "sgd, clip grad 0.1": 0.000819, "adam": 4.0e-5,
             "adam, clip grad 0.5": 1.32e-6, "adam, clip update 0.5": 0.000149,
             "adafactor": 1.08e-7, "adafactor, clip grad 0.5": 3.09e-9, "lion": 0.000196,
             "lion, clip update 0.5": 0.000334, "sign sgd": 0.000188, "normalized sgd": 0.002},
        20: {"sgd": 1.0, "sgd, clip grad 0.1": 0.000597, "adam": 4.73e-5,
             "adam, clip grad 0.5": 1.6e-6, "adam, clip update 0.5": 0.000155,
             "adafactor": 3.27e-7, "adafactor, clip grad 0.5": 6.06e-9, "lion": 0.000254,
             "lion, clip update 0.5": 0.000429, "sign sgd": 0.000187, "normalized sgd": 0.00212,
             "normalized sgd, clip grad 0.1": 0.000348},
    },
    # Tables 5 and 7 (code, one run).
    ("code", "sgd"): {
        2: {"sgd": 1.0, "adam": -0.00031, "adam, clip grad 0.5": 2.07e-7, "adafactor": 0.015206,
            "adafactor, clip grad 0.5": -8.57e-7, "lion": -0.013808},
        5: {"sgd": 1.0, "adam": 7.3e-5, "adam, clip grad 0.5": 5.32e-7, "adafactor": 0.00028,
            "adafactor, clip grad 0.5": -5.59e-8, "lion": 0.002276},
        10: {"sgd": 1.0, "adam": 0.000661, "adam, clip grad 0.5": 4.15e-8,
             "adafactor": 0.023778, "adafactor, clip grad 0.5": 6.84e-7, "lion": 0.005283},
        20: {"sgd": 1.0, "adam": 0.000605, "adam, clip grad 0.5": 2.79e-7,
             "adafactor": -0.001095, "adafactor, clip grad 0.5": -2.82e-6, "lion": 0.03734},
    },
    ("code", "adam"): {
        2: {"sgd": 1.0, "adam": -0.000237, "adam, clip grad 0.5": -7.8e-6, "adafactor": 0.002897,
            "adafactor, clip grad 0.5": 4.66e-7, "lion": -0.003176},
        5: {"sgd": 1.0, "adam": 0.000166, "adam, clip grad 0.5": -2.97e-8,
            "adafactor": -8.17e-5, "adafactor, clip grad 0.5": 6.31e-7, "lion": 1.56e-5},
        10: {"sgd": 1.0, "adam": -0.041286, "adam, clip grad 0.5": -1.3e-7,
             "adafactor": -0.002071, "adafactor, clip grad 0.5": 2.04e-6, "lion": -0.001063},
        20: {"sgd": 1.0, "adam": -0.000795, "adam, clip grad 0.5": 3.02e-6,
             "adafactor": 0.010273, "adafactor, clip grad 0.5": 0.000208, "lion": 0.000946},
    },
}

# Table 1 (translation, SGD trajectory, epoch 2, first run): raw sharpness.
TABLE1_SHARPNESS = {"sgd": 8.674583, "sgd, clip grad 0.1": 0.527104, "adam": 0.252707,
                    "adam, clip grad 0.5": 0.000574, "adafactor": 5.999e-5,
                    "adafactor, clip grad 0.5": 2.051e-7, "lion": 0.118202,
                    "normalized sgd": 0.722253, "normalized sgd, clip grad 0.1": 0.179141}

# Table 8: epoch -> (L, ℓ, L/ℓ, ε).
TABLE8 = {0: (3582.06, 1229.51, 2.91, 0.0159), 1: (2892.63, 899.70, 3.21, 0.0114),
          2: (10142.38, 4245.65, 2.39, 0.0235), 7: (15094.21, 7118.42, 2.12, 0.0183),
          8: (27881.08, 12477.13, 2.23, 0.0315), 9: (8046.26, 3471.40, 2.32, 0.0226)}

# Table 9 (ResNet-152, CIFAR-10, SGD trajectory): ratio to SGD.
TABLE9 = {
    2: {"sgd": 1.0, "sgd, clip grad 0.1": 0.208685, "adam": 4.812922,
        "adam, clip grad 0.1": 1.215817, "adafactor": 18.85215,
        "adafactor, clip grad 0.1": 5.098444, "lion": 2.106887, "sign sgd": 0.605515,
        "normalized sgd": 1.472489, "normalized sgd, clip grad 0.1": 0.266836},
    5: {"sgd": 1.0, "sgd, clip grad 0.1": 0.097681, "adam": 1.181251,
        "adam, clip grad 0.1": 0.30124, "adafactor": 1.919904, "adafactor, clip grad 0.1": 0.43885,
        "lion": 0.089412, "sign sgd": 0.133457, "normalized sgd": 1.323987,
        "normalized sgd, clip grad 0.1": 0.172629},
    10: {"sgd": 1.0, "sgd, clip grad 0.1": 0.283633, "adam": 0.377285,
         "adam, clip grad 0.1": 0.109241, "adafactor": 0.981839,
         "adafactor, clip grad 0.1": 0.283508, "lion": 0.069054, "sign sgd": 0.078127,
         "normalized sgd": 0.755517, "normalized sgd, clip grad 0.1": 0.317746},
}

# Claims the report gives a verdict on, in the paper's words.
CLAIMS = {
    "adaptive_sharper": "adaptive algorithms have much lower directional sharpness than SGD "
                        "(Tables 1, 4-7)",
    "clipping_helps": "coordinate-wise clipping almost always lowers directional sharpness "
                      "(Section 4.1)",
    "top_coordinates": "a small fraction of coordinates carries most of SGD's sharpness "
                       "(Figure 1, Section 4)",
    "resnet": "for ResNet, adaptive algorithms are NOT much less sharp than SGD (Table 9)",
    "smoothness": "removing coordinates with row norm >= 4x mean removes ~1-2.5% of coordinates "
                  "and makes the Gauss-Newton norm 2-3x smaller (Table 8)",
    "convergence": "clipping speeds up convergence (Figure 6)",
    "theory": "clipped SGD's directional sharpness is O(sqrt(eps) L + l), far below SGD's ~L "
              "(Theorems 1-2)",
    "rmed": "Adam's trajectory has smaller R_med than SGD's (seed 002)",
}
