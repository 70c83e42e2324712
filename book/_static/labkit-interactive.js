/* Interactive figures of the labkit book, without a kernel.
 *
 * A chapter computes every frame of a figure when the book is built (book/figstyle.py,
 * `interactive`) and writes them as JSON into
 *   <div class="labkit-interactive"><script type="application/json">{...}</script></div>.
 * This script draws the figure as SVG and redraws it when the reader moves the slider or
 * picks another option. It loads nothing and talks to no server.
 *
 * Spec: {xlabel, ylabel, xlim: [lo, hi], ylim: [lo, hi], aspect: "auto" | "equal",
 *        slider: {label, values: [...], digits, initial},
 *        choice: {label, options: [...], initial} (optional),
 *        background: [[xs, ys], ...] (grey polylines, optional),
 *        static: [series, ...], frames: [[[series, ...] per slider value] per option],
 *        notes: [[string per slider value] per option] (optional),
 *        grid: [...] (the x values of every series without its own, optional)}
 * series: {label, color, x: [...] (optional), y: [...], width, dash,
 *          markers: "all" | "only" | "ends" | null}.
 * Labels may use <i>, <sub> and <sup>.
 */
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var WIDTH = 640;
  var MARGIN = { left: 62, right: 14, top: 12, bottom: 46 };

  function svgEl(name, attrs, parent) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (parent) { parent.appendChild(node); }
    return node;
  }

  // Text with <i>, <sub> and <sup> into an SVG <text> (as tspans).
  function setSvgLabel(textNode, label) {
    var parts = String(label).split(/(<\/?(?:i|sub|sup)>)/);
    var style = { i: false, sub: false, sup: false };
    parts.forEach(function (part) {
      var tag = /^<(\/?)(i|sub|sup)>$/.exec(part);
      if (tag) { style[tag[2]] = tag[1] !== "/"; return; }
      if (!part) { return; }
      var span = svgEl("tspan", {}, textNode);
      span.textContent = part;
      if (style.i) { span.setAttribute("font-style", "italic"); }
      if (style.sub || style.sup) {
        span.setAttribute("baseline-shift", style.sub ? "sub" : "super");
        span.setAttribute("font-size", "75%");
      }
    });
  }

  // Text with <i>, <sub> and <sup> into an HTML element, without innerHTML.
  function setHtmlLabel(node, label) {
    var parts = String(label).split(/(<\/?(?:i|sub|sup)>)/);
    var stack = [node];
    parts.forEach(function (part) {
      var tag = /^<(\/?)(i|sub|sup)>$/.exec(part);
      if (tag) {
        if (tag[1] === "/") { if (stack.length > 1) { stack.pop(); } }
        else { var child = document.createElement(tag[2]); stack[stack.length - 1].appendChild(child); stack.push(child); }
      } else if (part) {
        stack[stack.length - 1].appendChild(document.createTextNode(part));
      }
    });
  }

  function niceTicks(lo, hi, count) {
    var span = hi - lo;
    var step = Math.pow(10, Math.floor(Math.log10(span / count)));
    var err = (span / count) / step;
    if (err >= 7.5) { step *= 10; } else if (err >= 3.5) { step *= 5; } else if (err >= 1.5) { step *= 2; }
    var ticks = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
      ticks.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    }
    var digits = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
    return ticks.map(function (t) { return [t, t.toFixed(digits)]; });
  }

  function draw(root) {
    var specNode = root.querySelector('script[type="application/json"]');
    if (!specNode) { return; }
    var spec = JSON.parse(specNode.textContent);
    var xlim = spec.xlim, ylim = spec.ylim;
    var plotW = WIDTH - MARGIN.left - MARGIN.right;
    var plotH = spec.aspect === "equal"
      ? plotW * (ylim[1] - ylim[0]) / (xlim[1] - xlim[0])
      : (spec.height || 300);
    var height = plotH + MARGIN.top + MARGIN.bottom;
    function sx(x) { return MARGIN.left + (x - xlim[0]) / (xlim[1] - xlim[0]) * plotW; }
    function sy(y) { return MARGIN.top + (ylim[1] - y) / (ylim[1] - ylim[0]) * plotH; }
    function pathOf(xs, ys) {
      var d = [];
      for (var k = 0; k < xs.length; k++) {
        d.push((k ? "L" : "M") + sx(xs[k]).toFixed(1) + " " + sy(ys[k]).toFixed(1));
      }
      return d.join("");
    }

    // Controls: the slider, and the options if any.
    var controls = document.createElement("div");
    controls.className = "lk-controls";
    var sliderLabel = document.createElement("label");
    var sliderName = document.createElement("span");
    setHtmlLabel(sliderName, spec.slider.label);
    var slider = document.createElement("input");
    slider.type = "range";
    slider.min = "0";
    slider.max = String(spec.slider.values.length - 1);
    slider.step = "1";
    slider.value = String(spec.slider.initial || 0);
    slider.className = "lk-slider";
    var readout = document.createElement("output");
    readout.className = "lk-readout";
    sliderLabel.appendChild(sliderName);
    sliderLabel.appendChild(slider);
    sliderLabel.appendChild(readout);
    controls.appendChild(sliderLabel);
    var choice = 0;
    var radios = [];
    if (spec.choice) {
      var group = document.createElement("fieldset");
      group.className = "lk-choice";
      var legendNode = document.createElement("legend");
      setHtmlLabel(legendNode, spec.choice.label);
      group.appendChild(legendNode);
      choice = spec.choice.initial || 0;
      var groupName = (root.id || "lk") + "-choice";
      spec.choice.options.forEach(function (option, k) {
        var label = document.createElement("label");
        var radio = document.createElement("input");
        radio.type = "radio";
        radio.name = groupName;
        radio.value = String(k);
        radio.checked = k === choice;
        radio.addEventListener("change", function () { if (radio.checked) { choice = k; update(); } });
        radios.push(radio);
        label.appendChild(radio);
        label.appendChild(document.createTextNode(" " + option));
        group.appendChild(label);
      });
      controls.appendChild(group);
    }

    // The plot.
    var svg = svgEl("svg", {
      viewBox: "0 0 " + WIDTH + " " + height.toFixed(0), width: "100%",
      role: "img", "class": "lk-plot",
    });
    var clipId = (root.id || "lk") + "-clip";
    var clip = svgEl("clipPath", { id: clipId }, svgEl("defs", {}, svg));
    svgEl("rect", { x: MARGIN.left, y: MARGIN.top, width: plotW, height: plotH }, clip);
    var axes = svgEl("g", { "class": "lk-axes" }, svg);
    niceTicks(xlim[0], xlim[1], 8).forEach(function (t) {
      svgEl("line", { x1: sx(t[0]), x2: sx(t[0]), y1: MARGIN.top + plotH, y2: MARGIN.top + plotH + 5 }, axes);
      svgEl("text", { x: sx(t[0]), y: MARGIN.top + plotH + 18, "text-anchor": "middle" }, axes).textContent = t[1];
    });
    niceTicks(ylim[0], ylim[1], 6).forEach(function (t) {
      svgEl("line", { x1: MARGIN.left - 5, x2: MARGIN.left, y1: sy(t[0]), y2: sy(t[0]) }, axes);
      svgEl("text", { x: MARGIN.left - 8, y: sy(t[0]) + 4, "text-anchor": "end" }, axes).textContent = t[1];
    });
    svgEl("rect", { x: MARGIN.left, y: MARGIN.top, width: plotW, height: plotH, "class": "lk-frame" }, axes);
    setSvgLabel(svgEl("text", { x: MARGIN.left + plotW / 2, y: height - 8, "text-anchor": "middle" }, axes), spec.xlabel);
    setSvgLabel(svgEl("text", {
      x: 16, y: MARGIN.top + plotH / 2, "text-anchor": "middle",
      transform: "rotate(-90 16 " + (MARGIN.top + plotH / 2) + ")",
    }, axes), spec.ylabel);
    var data = svgEl("g", { "clip-path": "url(#" + clipId + ")" }, svg);
    (spec.background || []).forEach(function (line) {
      svgEl("path", { d: pathOf(line[0], line[1]), "class": "lk-background" }, data);
    });
    var staticLayer = svgEl("g", {}, data);
    var frameLayer = svgEl("g", { "class": "lk-frame-series" }, data);
    var legend = document.createElement("div");
    legend.className = "lk-legend";
    var note = document.createElement("p");
    note.className = "lk-note";

    function addSeries(layer, s) {
      if (!s.x) { s = Object.assign({}, s, { x: spec.grid }); }
      var attrs = {
        d: pathOf(s.x, s.y), fill: "none", stroke: s.color,
        "stroke-width": s.width || 1.6, "stroke-linejoin": "round",
      };
      if (s.dash) { attrs["stroke-dasharray"] = s.dash; }
      if (s.markers === "only") { attrs["stroke-width"] = 0; }
      svgEl("path", attrs, layer);
      var marks = s.markers === "all" || s.markers === "only"
        ? s.x.map(function (_, k) { return k; })
        : (s.markers === "ends" ? [0, s.x.length - 1] : []);
      marks.forEach(function (k) {
        svgEl("circle", { cx: sx(s.x[k]), cy: sy(s.y[k]), r: 3.2, fill: s.color }, layer);
      });
    }

    function legendEntry(s) {
      var item = document.createElement("span");
      item.className = "lk-legend-item";
      var swatch = document.createElement("span");
      if (s.markers === "only") {
        swatch.className = "lk-dot";
        swatch.style.backgroundColor = s.color;
      } else {
        swatch.className = "lk-swatch";
        swatch.style.borderTopColor = s.color;
        swatch.style.borderTopStyle = s.dash ? "dashed" : "solid";
      }
      item.appendChild(swatch);
      var text = document.createElement("span");
      setHtmlLabel(text, s.label);
      item.appendChild(text);
      legend.appendChild(item);
    }

    (spec.static || []).forEach(function (s) { addSeries(staticLayer, s); });

    function update() {
      var index = Number(slider.value);
      readout.value = Number(spec.slider.values[index]).toFixed(spec.slider.digits || 2);
      readout.textContent = readout.value;
      while (frameLayer.firstChild) { frameLayer.removeChild(frameLayer.firstChild); }
      while (legend.firstChild) { legend.removeChild(legend.firstChild); }
      var series = spec.frames[choice][index];
      series.forEach(function (s) { addSeries(frameLayer, s); });
      (spec.static || []).concat(series).forEach(function (s) { if (s.label) { legendEntry(s); } });
      note.textContent = spec.notes ? spec.notes[choice][index] : "";
      root.setAttribute("data-frame", choice + ":" + index);
    }

    slider.addEventListener("input", update);
    root.appendChild(controls);
    root.appendChild(svg);
    root.appendChild(legend);
    root.appendChild(note);
    update();
  }

  function start() {
    var figures = document.querySelectorAll(".labkit-interactive");
    for (var k = 0; k < figures.length; k++) { draw(figures[k]); }
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
