// Model output as Markdown, safely and block by block.
//
// marked turns the text into HTML, DOMPurify keeps only an allowlist of elements and attributes
// (no script, no event handlers, no images, links only to http(s) and mailto), and raw HTML in
// the model's text is shown as text, never parsed. A growing answer is re-rendered from the
// first top-level block whose source changed, so the blocks before it -- and a reader's text
// selection inside them -- stay the very same DOM nodes while the answer streams in.
//
// Model output is hostile input for the renderer too: marked recurses without bound on nesting
// ('>' x 5000 overflows the stack), its inline rules and highlight.js 9's grammars take time
// quadratic in some inputs (40 KB of "a " as C++ takes 10 s). So every render falls back to
// plain text when it throws, and the expensive parts run only on bounded input (the limits
// below): a message or a run of inline text over its limit is shown as plain text, a code block
// over its limit (or past the message's budget, or still streaming) unhighlighted.
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
  // A message longer than this is shown as plain text, never parsed (the gateway keeps answers
  // of up to ~1 MB; a reply that long is not read as formatting anyway).
  const MAX_MARKDOWN_CHARS = 100 * 1000;
  // One paragraph's (or list item's, or cell's) inline text longer than this stays plain text:
  // marked's emphasis rules take ~0.1 s at this size, 2 s at 40 KB.
  const MAX_INLINE_CHARS = 8 * 1000;
  // A code block longer than this is not highlighted (still labelled, still with Copy): the
  // worst grammars take ~0.2 s at this size. And one message highlights at most the total.
  const MAX_HIGHLIGHT_CHARS = 5 * 1000;
  const MAX_HIGHLIGHT_TOTAL = 15 * 1000;
  const source = new WeakMap();  // rendered block element -> the Markdown it came from
  const spent = new WeakMap();  // rendered block element -> the characters it highlighted
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

  // The text as it came, for a block or message that cannot (or must not) be rendered.
  function plainBlock(text) {
    const block = document.createElement("div");
    block.className = "md-block plain";
    block.textContent = text;
    return block;
  }

  // Like marked.lexer, but a run of inline text over MAX_INLINE_CHARS is kept as escaped text
  // instead of going through the inline rules. (marked 4.2.3's own lex(), in steps.)
  function lex(markdown) {
    const lexer = new marked.Lexer(marked.defaults);
    lexer.blockTokens(markdown.replace(/\r\n|\r/g, "\n"), lexer.tokens);
    for (const next of lexer.inlineQueue) {
      if (next.src.length > MAX_INLINE_CHARS) {
        next.tokens.push({ type: "text", raw: next.src, text: escapeHtml(next.src) });
      } else {
        lexer.inlineTokens(next.src, next.tokens);
      }
    }
    lexer.inlineQueue = [];
    return lexer.tokens;
  }

  // budget: how many characters of code this block may highlight (0 while it is still
  // streaming: a growing block would be highlighted again on every frame).
  function renderBlock(token, links, budget) {
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
    let used = 0;
    for (const pre of block.querySelectorAll("pre")) used += decorateCode(pre, budget - used);
    spent.set(block, used);
    return block;
  }

  // Returns how many characters it highlighted.
  function decorateCode(pre, budget) {
    const code = pre.querySelector("code") || pre;
    const match = /(?:^|\s)language-(\S+)/.exec(code.className);
    const language = match ? match[1] : "";
    const text = code.textContent;
    let used = 0;
    if (language && text.length <= Math.min(budget, MAX_HIGHLIGHT_CHARS)
        && hljs.getLanguage(language)) {
      try {
        const html = hljs.highlight(language, text, true).value;
        code.replaceChildren(DOMPurify.sanitize(html, HIGHLIGHTED));
        code.classList.add("hljs");
        used = text.length;
      } catch (_) {
        code.textContent = text;  // as it came: the code is still shown, only not coloured
      }
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
    return used;
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
  // from the first block whose source differs. `streaming`: more text is still to come, so the
  // last block is not final (its code is highlighted only once it is).
  function render(container, markdown, { streaming = false } = {}) {
    try {
      renderMarkdown(container, markdown, streaming);
    } catch (_) {
      // Whatever the model sent, the reader sees it: as text, if not as Markdown.
      linksOf.delete(container);
      container.replaceChildren(plainBlock(markdown));
    }
  }

  function renderMarkdown(container, markdown, streaming) {
    if (markdown.length > MAX_MARKDOWN_CHARS) {
      const only = container.children.length === 1 && container.firstElementChild;
      if (!(only && only.classList.contains("plain") && linksOf.get(container) === null)) {
        container.replaceChildren(plainBlock(""));
        linksOf.set(container, null);
      }
      const block = container.firstElementChild;
      if (block.textContent !== markdown) block.textContent = markdown;
      return;
    }
    const tokens = lex(markdown);
    htmlAsText(tokens);
    const blocks = tokens.filter((token) => token.type !== "space");
    const links = JSON.stringify(tokens.links || {});
    // A block's key is its source, marked unfinished while it may still grow.
    const keys = blocks.map((token, index) =>
      (streaming && index === blocks.length - 1 ? "\0" : "") + token.raw);
    const shown = [...container.children];
    let same = 0;
    if (linksOf.get(container) === links) {
      while (same < blocks.length && same < shown.length
             && source.get(shown[same]) === keys[same]) same += 1;
    }
    linksOf.set(container, links);
    let budget = MAX_HIGHLIGHT_TOTAL;
    for (const kept of shown.slice(0, same)) budget -= spent.get(kept) || 0;
    for (const stale of shown.slice(same)) stale.remove();
    for (let index = same; index < blocks.length; index += 1) {
      const token = blocks[index];
      const unfinished = keys[index] !== token.raw;
      let block;
      try {
        block = renderBlock(token, tokens.links, unfinished ? 0 : budget);
      } catch (_) {
        block = plainBlock(token.raw);  // this block only: the others are Markdown still
      }
      budget -= spent.get(block) || 0;
      source.set(block, keys[index]);
      container.append(block);
    }
  }

  return { render, copyText, MAX_MARKDOWN_CHARS, MAX_INLINE_CHARS, MAX_HIGHLIGHT_CHARS,
           MAX_HIGHLIGHT_TOTAL };
})();
