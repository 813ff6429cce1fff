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

# Tables 4 and 6 run by run (3 experiments each): ratio to SGD per probe epoch.
TABLE4_RUNS = {
    2: {
        'sgd': [1.0, 1.0, 1.0],
        'sgd, clip grad 0.1': [0.060764, 0.04182, 0.041375],
        'adam': [0.029132, 0.020919, 0.020288],
        'adam, clip grad 0.5': [6.62e-05, 4.62e-05, 4.56e-05],
        'adam, clip update 0.5': [0.021666, 0.014873, 0.014498],
        'adafactor': [6.91e-06, 4.47e-06, 3.91e-06],
        'adafactor, clip grad 0.5': [2.36e-08, 1.49e-08, 1.25e-08],
        'lion': [0.013626, 0.009318, 0.00908],
        'lion, clip update 0.5': [0.024812, 0.016958, 0.016522],
        'sign sgd': [0.009136, 0.006336, 0.006284],
        'normalized sgd': [0.083261, 0.056086, 0.055766],
        'normalized sgd, clip grad 0.1': [0.020651, 0.01418, 0.013987],
    },
    5: {
        'sgd': [1.0, 1.0, 1.0],
        'sgd, clip grad 0.1': [0.010348, 0.015692, -0.00493],
        'adam': [0.003186, 0.004729, -0.000738],
        'adam, clip grad 0.5': [1.04e-05, 1.75e-05, 8.79e-06],
        'adam, clip update 0.5': [0.002292, 0.003452, -0.000687],
        'adafactor': [7.61e-07, 1.13e-06, 5.07e-07],
        'adafactor, clip grad 0.5': [3.07e-09, 5.01e-09, 4.24e-09],
        'lion': [0.001448, 0.00218, -0.000473],
        'lion, clip update 0.5': [0.002629, 0.003959, -0.000863],
        'sign sgd': [0.001542, 0.002334, -0.000362],
        'normalized sgd': [0.013939, 0.021917, 0.005331],
        'normalized sgd, clip grad 0.1': [0.003351, 0.005242, -0.000223],
    },
    10: {
        'sgd': [1.0, 1.0, 1.0],
        'sgd, clip grad 0.1': [0.038175, 0.033345, 0.044562],
        'adam': [0.010894, 0.009658, 0.013078],
        'adam, clip grad 0.5': [5.4e-05, 4.83e-05, 6.47e-05],
        'adam, clip update 0.5': [0.008573, 0.007475, 0.010194],
        'adafactor': [2.59e-06, 3.31e-06, 3.09e-06],
        'adafactor, clip grad 0.5': [1.4e-08, 1.69e-08, 1.7e-08],
        'lion': [0.005113, 0.004561, 0.006098],
        'lion, clip update 0.5': [0.009256, 0.008259, 0.011046],
        'sign sgd': [0.005738, 0.00497, 0.006808],
        'normalized sgd': [0.053926, 0.046155, 0.061938],
        'normalized sgd, clip grad 0.1': [0.012715, 0.01102, 0.014784],
    },
    20: {
        'sgd': [1.0, 1.0, 1.0],
        'sgd, clip grad 0.1': [0.046561, -0.009589, 0.043289],
        'adam': [0.012866, -0.002554, 0.011917],
        'adam, clip grad 0.5': [9.15e-05, -1.97e-05, 8.71e-05],
        'adam, clip update 0.5': [0.010421, -0.002174, 0.009732],
        'adafactor': [3.02e-06, -6.96e-07, 2.7e-06],
        'adafactor, clip grad 0.5': [2.46e-08, -6.03e-09, 2.23e-08],
        'lion': [0.006787, -0.001373, 0.006381],
        'lion, clip update 0.5': [0.012249, -0.002472, 0.011518],
        'sign sgd': [0.006936, -0.001495, 0.006453],
        'normalized sgd': [0.066658, -0.014244, 0.06107],
        'normalized sgd, clip grad 0.1': [0.015486, -0.00331, 0.014405],
    },
}
TABLE6_RUNS = {
    2: {
        'sgd': [1.0, 1.0, 1.0],
        'sgd, clip grad 0.1': [0.002899, 0.003474, 0.003715],
        'adam': [0.003248, 0.003711, 0.00396],
        'adam, clip grad 0.5': [6.24e-05, 5.58e-05, 6.71e-05],
        'adam, clip update 0.5': [0.00284, 0.003167, 0.003346],
        'adafactor': [4.1e-07, 3.42e-07, 5.83e-07],
        'adafactor, clip grad 0.5': [1.53e-08, 1.14e-08, 1.79e-08],
        'lion': [0.001195, 0.001467, 0.001468],
        'lion, clip update 0.5': [0.00212, 0.002613, 0.002611],
        'sign sgd': [0.000638, 0.000762, 0.000765],
        'normalized sgd': [0.01143, 0.009482, 0.011515],
    },
    5: {
        'sgd': [1.0, 1.0, 1.0],
        'sgd, clip grad 0.1': [0.003316, 0.002051, 0.002137],
        'adam': [0.000294, 0.000151, 0.000345],
        'adam, clip grad 0.5': [8.33e-07, 5.14e-07, 1.05e-05],
        'adam, clip update 0.5': [0.001268, 0.000636, 0.000565],
        'adafactor': [2.5e-07, 1.46e-07, 1.16e-07],
        'adafactor, clip grad 0.5': [2.59e-09, 1.83e-09, 5.99e-09],
        'lion': [0.000495, 0.000338, 0.000274],
        'lion, clip update 0.5': [0.000862, 0.000586, 0.000483],
        'sign sgd': [0.000673, 0.000408, 0.000373],
        'normalized sgd': [0.00463, 0.003971, 0.003808],
    },
    10: {
        'sgd': [1.0, 1.0, 1.0],
        'sgd, clip grad 0.1': [0.000693, 0.000805, 0.00096],
        'adam': [1.44e-05, 1.94e-05, 8.62e-05],
        'adam, clip grad 0.5': [1.04e-07, 1.38e-07, 3.71e-06],
        'adam, clip update 0.5': [0.00013, 0.000168, 0.000148],
        'adafactor': [1.13e-07, 7.67e-08, 1.33e-07],
        'adafactor, clip grad 0.5': [1.69e-09, 1.23e-09, 6.34e-09],
        'lion': [0.000195, 0.000206, 0.000185],
        'lion, clip update 0.5': [0.000329, 0.000349, 0.000325],
        'sign sgd': [0.000167, 0.000216, 0.00018],
        'normalized sgd': [0.00202, 0.002424, 0.001556],
    },
    20: {
        'sgd': [1.0, 1.0, 1.0],
        'sgd, clip grad 0.1': [0.00028, 0.000492, 0.001019],
        'adam': [7.68e-06, 1.62e-05, 0.000118],
        'adam, clip grad 0.5': [8.58e-08, 1.64e-07, 4.54e-06],
        'adam, clip update 0.5': [9.61e-05, 0.000178, 0.00019],
        'adafactor': [3.77e-07, 3.97e-07, 2.06e-07],
        'adafactor, clip grad 0.5': [4.89e-09, 5.12e-09, 8.16e-09],
        'lion': [0.000222, 0.000296, 0.000244],
        'lion, clip update 0.5': [0.000369, 0.000491, 0.000427],
        'sign sgd': [0.00014, 0.000223, 0.000197],
        'normalized sgd': [0.002141, 0.002281, 0.001938],
        'normalized sgd, clip grad 0.1': [0.000247, 0.000393, 0.000405],
    },
}
RUNS = {("translation", "sgd"): TABLE4_RUNS, ("translation", "adam"): TABLE6_RUNS}
TABLE_NUMBERS = {("translation", "sgd"): 4, ("code", "sgd"): 5, ("translation", "adam"): 6,
                 ("code", "adam"): 7}


def negative_entries(task: str, trajectory: str) -> tuple:
  """(negative, all) per-run entries of the paper's table for (task, trajectory)."""
  runs = RUNS.get((task, trajectory))
  if runs is not None:
    values = [v for rows in runs.values() for row in rows.values() for v in row]
  else:
    values = [v for rows in SHARPNESS_RATIO[(task, trajectory)].values() for v in rows.values()]
  return sum(v < 0 for v in values), len(values)


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


def ratios_of(task: str, name: str) -> list:
  """The paper's mean ratios to SGD of algorithm ``name`` over its tables of ``task`` (both
  trajectories, every probe epoch): the numbers our medians stand beside."""
  return [row[name] for (t, _), epochs in SHARPNESS_RATIO.items() if t == task
          for row in epochs.values() if name in row]


def clipping_share() -> tuple:
  """(pairs where the clipped variant's mean ratio is below the unclipped one's, all pairs)
  over the paper's Tables 4-7."""
  lowered = total = 0
  for epochs in SHARPNESS_RATIO.values():
    for row in epochs.values():
      for name, value in row.items():
        if ", clip grad" in name and name.split(",")[0] in row:
          total += 1
          lowered += abs(value) < abs(row[name.split(",")[0]])
  return lowered, total
