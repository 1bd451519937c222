"""The command line: `metaembed ...` (`main`) and the absl programs that train.py / eval.py /
`metaembed train|eval|data` run (`apps`)."""
