"""HTML reports and figures. A failed figure or report never fails a run."""
