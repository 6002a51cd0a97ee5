// ComfyUI-MMIG frontend extension: shows a node's text result (`ui.text`: captions, descriptions, LLMGA
// prompts, LoRA reports) on the node itself, read-only. The STRING outputs are unchanged, so the text can
// still be wired on. Uses only APIs both the 2024 legacy frontend and the current ComfyUI_frontend offer:
// app.registerExtension, beforeRegisterNodeDef, nodeType.prototype.onExecuted / onSerialize, addDOMWidget.
import { app } from "../../../scripts/app.js"; // served at /extensions/<pack>/js/;

const RESULT_WIDGET = "mmig_result";

function resultWidget(node) {
  let widget = node.widgets?.find((w) => w.name === RESULT_WIDGET);
  if (widget) return widget;
  const area = document.createElement("textarea");
  area.readOnly = true;
  area.className = "comfy-multiline-input mmig-result";
  area.dataset.mmigResult = "true";
  area.placeholder = "result";
  Object.assign(area.style, { opacity: "0.85", resize: "none" });
  widget = node.addDOMWidget(RESULT_WIDGET, "mmig_text", area, {
    serialize: false, // not an input of the node: never sent to the server
    getValue: () => area.value,
    setValue: (v) => { area.value = v ?? ""; },
  });
  widget.serialize = false; // the newer frontend's node serialisation skips it by this flag
  return widget;
}

function showText(node, text) {
  const widget = resultWidget(node);
  widget.value = text;
  node.mmigResultText = text; // read by tests/browser
  const wanted = node.computeSize?.();
  if (wanted && node.setSize) {
    node.setSize([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1])]);
  }
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "ComfyUI-MMIG.ResultText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("MMIG_")) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (Array.isArray(text) && text.length) showText(this, text.join("\n"));
      return result;
    };

    // The legacy frontend writes every widget's value into widgets_values; the result is output, not a setting,
    // and must not shift the values of inputs a later version adds at the end.
    const onSerialize = nodeType.prototype.onSerialize;
    nodeType.prototype.onSerialize = function (data) {
      const result = onSerialize?.apply(this, arguments);
      const index = this.widgets?.findIndex((w) => w.name === RESULT_WIDGET) ?? -1;
      if (index >= 0 && Array.isArray(data?.widgets_values) && data.widgets_values.length === this.widgets.length) {
        data.widgets_values.splice(index, 1);
      }
      return result;
    };
  },
});
