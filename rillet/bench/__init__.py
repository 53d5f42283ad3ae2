"""`rillet bench`: a streaming load generator for OpenAI-compatible servers, scored with Andes QoE.

datasets.py makes the seeded requests, loadgen.py sends them (open or closed loop) and times each token,
qoe.py turns one request's token arrivals into its metrics, report.py aggregates, prints and plots,
cli.py is the command.
"""
