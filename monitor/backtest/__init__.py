"""Backtest: replay labelled history through retraining policies with the live loop's own code."""
