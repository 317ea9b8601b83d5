"""Fit a model to a memory budget: a format per quantizable unit (issue 17), chosen exactly."""
