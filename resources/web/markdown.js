// Model output as Markdown, safely and block by block.
//
// marked turns the text into HTML, DOMPurify keeps only an allowlist of elements and attributes
// (no script, no event handlers, no images, links only to http(s) and mailto), and raw HTML in
// the model's text is shown as text, never parsed. A growing answer is re-rendered from the
// first top-level block whose source changed, so the blocks before it -- and a reader's text
// selection inside them -- stay the very same DOM nodes while the answer streams in.
"use strict";

const LMGateMarkdown = (() => {
  const ALLOWED = {
    ALLOWED_TAGS: ["a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5",
                   "h6", "hr", "input", "li", "ol", "p", "pre", "strong", "table", "tbody", "td",
                   "th", "thead", "tr", "ul"],
    ALLOWED_ATTR: ["href", "title", "class", "align", "start", "type", "checked", "disabled"],
    // Every attribute not named URI-safe must match this pattern, not only href.
    ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
    ADD_URI_SAFE_ATTR: ["align", "start", "type"],
    ALLOW_DATA_ATTR: false,
    ALLOW_ARIA_ATTR: false,
    RETURN_DOM_FRAGMENT: true,
  };
  const HIGHLIGHTED = { ALLOWED_TAGS: ["span"], ALLOWED_ATTR: ["class"], RETURN_DOM_FRAGMENT: true };
  const source = new WeakMap();  // rendered block element -> the Markdown it came from
  const linksOf = new WeakMap();  // answer container -> its reference links, as JSON

  marked.setOptions({ gfm: true, breaks: true, headerIds: false, mangle: false });
  marked.use({
    renderer: {
      // An image would be a request to wherever the model says: offer it as a link instead.
      image(href, title, text) {
        return `<a href="${escapeHtml(href || "")}">${text || "image"}</a>`;
      },
    },
  });
  hljs.configure({ hideUpgradeWarningAcceptNoSupportOrSecurityUpdates: true });
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    } else if (node.tagName === "INPUT") {
      // GFM task lists only: a ticked or empty box that nobody can change.
      if (node.getAttribute("type") === "checkbox") node.setAttribute("disabled", "");
      else node.remove();
    }
  });

  function escapeHtml(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  // Raw HTML in the model's text becomes plain text: a block of it a paragraph, inline tags text.
  function htmlAsText(tokens) {
    marked.walkTokens(tokens, (token) => {
      if (token.type !== "html") return;
      const text = escapeHtml(token.text);
      if ("inLink" in token) {
        token.type = "text";
        token.text = text;
      } else {
        token.type = "paragraph";
        token.tokens = [{ type: "text", raw: token.raw, text }];
      }
    });
  }

  function renderBlock(token, links) {
    const tokens = [token];
    tokens.links = links;
    const fragment = DOMPurify.sanitize(marked.parser(tokens), ALLOWED);
    const block = document.createElement("div");
    block.className = "md-block";
    block.append(fragment);
    for (const table of block.querySelectorAll("table")) {
      const wrap = document.createElement("div");
      wrap.className = "table-wrap";  // a wide table scrolls inside it, not the whole page
      table.replaceWith(wrap);
      wrap.append(table);
    }
    // A link DOMPurify took the address from (javascript:, data:, ...) is no link at all.
    for (const dead of block.querySelectorAll("a:not([href])")) dead.replaceWith(...dead.childNodes);
    for (const pre of block.querySelectorAll("pre")) decorateCode(pre);
    return block;
  }

  function decorateCode(pre) {
    const code = pre.querySelector("code") || pre;
    const match = /(?:^|\s)language-(\S+)/.exec(code.className);
    const language = match ? match[1] : "";
    const text = code.textContent;
    if (language && hljs.getLanguage(language)) {
      const html = hljs.highlight(language, text, true).value;
      code.replaceChildren(DOMPurify.sanitize(html, HIGHLIGHTED));
      code.classList.add("hljs");
    }
    const head = document.createElement("div");
    head.className = "code-head";
    const label = document.createElement("span");
    label.className = "code-lang";
    label.textContent = language || "code";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", `Copy ${language || "code"}`);
    copy.addEventListener("click", () => copyText(text, copy));
    head.append(label, copy);
    const box = document.createElement("div");
    box.className = "code-block";
    pre.replaceWith(box);
    box.append(head, pre);
  }

  async function copyText(text, button) {
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(text);
      } else {
        // Plain http on a LAN is not a secure context: the old way still works there.
        const area = document.createElement("textarea");
        area.className = "offscreen";
        area.value = text;
        document.body.append(area);
        area.select();
        const copied = document.execCommand("copy");
        area.remove();
        if (!copied) throw new Error("copy refused");
      }
      button.textContent = "Copied";
    } catch (_) {
      button.textContent = "Copy failed";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  }

  // Bring `container` (a div of .md-block children) up to date with `markdown`, rebuilding only
  // from the first block whose source differs.
  function render(container, markdown) {
    const tokens = marked.lexer(markdown);
    htmlAsText(tokens);
    const blocks = tokens.filter((token) => token.type !== "space");
    const links = JSON.stringify(tokens.links || {});
    const shown = [...container.children];
    let same = 0;
    if (linksOf.get(container) === links) {
      while (same < blocks.length && same < shown.length
             && source.get(shown[same]) === blocks[same].raw) same += 1;
    }
    linksOf.set(container, links);
    for (const stale of shown.slice(same)) stale.remove();
    for (const token of blocks.slice(same)) {
      const block = renderBlock(token, tokens.links);
      source.set(block, token.raw);
      container.append(block);
    }
  }

  return { render, copyText };
})();
